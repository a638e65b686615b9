//! Fake API server protocol suites (list/watch, writes, garbage collection), linked as one
//! test binary.

mod list_watch;
mod services_gc;
mod support;
mod writes;
