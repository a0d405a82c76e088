//! Recognising image formats that are not raw, so that a qcow2 (or vmdk, vdi,
//! vhdx, vhd, qed) file is refused instead of being sliced as if its header
//! and allocation tables were the disk's bytes.

/// Bytes at the start of an image that [`detect`] needs.
pub const PROBE_HEAD: usize = 4096;
/// Bytes at the end of an image that [`detect`] needs (a fixed VHD keeps its
/// only header, a footer, in the last 512 bytes).
pub const PROBE_TAIL: usize = 512;

/// Returns the name of the non-raw format whose header `head` (the first
/// bytes of the image) or `tail` (its last 512 bytes) carries, if any.
pub fn detect(head: &[u8], tail: &[u8]) -> Option<&'static str> {
    let starts = |magic: &[u8]| head.len() >= magic.len() && &head[..magic.len()] == magic;
    if starts(b"QFI\xfb") {
        return Some("qcow2");
    }
    if starts(b"QED\0") {
        return Some("qed");
    }
    if starts(b"KDMV") || starts(b"COWD") || starts(b"# Disk DescriptorFile") {
        return Some("vmdk");
    }
    if starts(b"vhdxfile") {
        return Some("vhdx");
    }
    if starts(b"conectix") || (tail.len() >= 8 && &tail[..8] == b"conectix") {
        return Some("vhd (vpc)");
    }
    // VDI: a text banner, then the signature 0xbeda107f (little-endian) at 0x40.
    if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        return Some("vdi");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognised() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03", &[]), Some("qcow2"));
        assert_eq!(detect(b"KDMV\x01\0\0\0", &[]), Some("vmdk"));
        assert_eq!(detect(b"vhdxfile", &[]), Some("vhdx"));
        assert_eq!(detect(b"QED\0", &[]), Some("qed"));
        let mut vdi = vec![0u8; 0x200];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(detect(&vdi, &[]), Some("vdi"));
        let mut tail = vec![0u8; 512];
        tail[..8].copy_from_slice(b"conectix");
        assert_eq!(detect(&[0u8; 4096], &tail), Some("vhd (vpc)"));
        // An ext4 image or zeros are raw.
        assert_eq!(detect(&[0u8; 4096], &[0u8; 512]), None);
        assert_eq!(detect(&[], &[]), None);
    }
}
