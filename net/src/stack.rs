//! The userspace TCP/IP stack, filled in by the stack work.
