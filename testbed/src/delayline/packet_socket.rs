//! A raw AF_PACKET socket bound to one interface, carrying each frame with
//! its virtio-net header (so TCP's 64 KiB GSO frames pass whole, with their
//! checksum state), read and written in batches (recvmmsg/sendmmsg).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Largest frame plus header we accept: a 64 KiB GSO frame, the 10-byte
/// virtio-net header and an Ethernet header, rounded up.
pub const MAX_FRAME: usize = 70 * 1024;

// From <linux/if_packet.h>; libc lacks the last one on some targets.
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_STATISTICS: libc::c_int = 6;

/// One interface's packet socket (frames in and out carry a virtio-net header).
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(ret)
    }
}

fn set_opt(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed; the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret, what).map(drop)
}

impl PacketSocket {
    /// Opens a socket on `ifname` that sees every frame the interface
    /// receives (not the ones sent through it), with a receive buffer of
    /// `rcvbuf` bytes.
    pub fn open(ifname: &str, rcvbuf: usize) -> io::Result<Self> {
        let name =
            CString::new(ifname).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
        // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("interface {ifname}: {e}")));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) takes plain integers.
        let raw = check(
            unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::c_int::from(proto),
                )
            },
            "socket(AF_PACKET)",
        )?;
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_opt(raw, libc::SOL_PACKET, PACKET_VNET_HDR, 1, "PACKET_VNET_HDR")?;
        set_opt(
            raw,
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            1,
            "PACKET_IGNORE_OUTGOING",
        )?;
        let rcvbuf = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        set_opt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            rcvbuf,
            "SO_RCVBUFFORCE",
        )?;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `addr` is a live sockaddr_ll and its exact size is passed.
        let ret = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(ret, "bind")?;
        Ok(Self { fd })
    }

    /// Blocks until at least one frame arrives, then takes up to
    /// `bufs.len()` that are waiting. Returns each frame's length; a length
    /// of 0 marks a frame truncated by a buffer shorter than it.
    pub fn recv_batch(&self, bufs: &mut [Vec<u8>], lens: &mut Vec<usize>) -> io::Result<()> {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is valid (no name, no control).
        let mut msgs: Vec<libc::mmsghdr> = (0..iovs.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every msghdr points at one iovec over a live, writable
        // buffer of the stated length; `msgs` and `iovs` outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let n = check(n, "recvmmsg")? as usize;
        lens.clear();
        lens.extend(msgs[..n].iter().map(|m| {
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                0
            } else {
                m.msg_len as usize
            }
        }));
        Ok(())
    }

    /// Sends every frame of `frames` (each with its virtio-net header).
    /// Returns how many the device refused (each is skipped, not retried).
    pub fn send_batch(&self, frames: &[&[u8]]) -> io::Result<u64> {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: as in recv_batch.
        let mut msgs: Vec<libc::mmsghdr> = (0..iovs.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        let mut refused = 0;
        while done < msgs.len() {
            // SAFETY: every msghdr points at one iovec over a live buffer of
            // the stated length; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (msgs.len() - done) as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                // sendmmsg fails only for its first frame: skip that one.
                _ if n < 0 && e.raw_os_error() != Some(libc::EBADF) => {
                    done += 1;
                    refused += 1;
                }
                _ => return Err(io::Error::new(e.kind(), format!("sendmmsg: {e}"))),
            }
        }
        Ok(refused)
    }

    /// Frames the kernel dropped because this socket's buffer was full
    /// (since the last call: reading resets the kernel's counter).
    pub fn kernel_drops(&self) -> io::Result<u64> {
        #[repr(C)]
        #[derive(Default)]
        struct TpacketStats {
            packets: u32,
            drops: u32,
        }
        let mut stats = TpacketStats::default();
        let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
        // SAFETY: `stats` is a live, writable tpacket_stats and `len` its size.
        let ret = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                (&mut stats as *mut TpacketStats).cast(),
                &mut len,
            )
        };
        check(ret, "PACKET_STATISTICS")?;
        Ok(u64::from(stats.drops))
    }
}
