//! Writing to stdout and stderr without dying of a closed pipe.
//!
//! Rust ignores SIGPIPE, so after `pgshift … | head` has exited a write fails with EPIPE, and
//! `println!` panics on it. Dying of SIGPIPE instead would be worse: in the middle of a cutover
//! it would leave clients paused. So a reader that went away loses what it did not read, and
//! pgshift carries on.

use std::io::{self, Write};

/// Writes a report to stdout. A closed pipe is not an error; any other failure is (a full disk
/// under a redirect loses the report, which the user must hear about).
pub fn out(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes progress or a message to stderr. A failure is dropped: there is nowhere left to
/// report it, and it must not stop the command.
pub fn err(text: &str) {
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

/// Stderr for the log (tracing): every write succeeds, as [`err`]. tracing-subscriber would
/// otherwise report a failed write with `eprintln!`, which panics on a closed stderr.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
