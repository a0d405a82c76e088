//! Running VMs under QEMU, driven through QMP (issue 9).
