//! Network namespaces for privileged tests (filled in below).
