//! The agent logs to stderr. Under systemd stderr is a journal stream; there each line starts
//! with its syslog priority (`<3>` error ... `<7>` debug, what journald reads with
//! SyslogLevelPrefix=yes, its default), so `journalctl -p warning -u sg-agent` filters as it
//! should. Anywhere else the lines are left as they are.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// Whether stderr is the stream systemd connected to the journal: it sets JOURNAL_STREAM to
/// that stream's `<device>:<inode>`. (A child that inherited the variable but not the stream
/// does not match.)
pub fn stderr_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|v| is_stream(&v, 2))
}

/// Whether `fd` is the stream `<device>:<inode>` names.
fn is_stream(journal_stream: &str, fd: i32) -> bool {
    let Some((dev, ino)) = journal_stream.split_once(':') else {
        return false;
    };
    // SAFETY: fstat fills the struct it is given; an all-zero stat is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// An event format that writes the syslog priority prefix before the inner format's line
/// when `journal` is set.
pub struct Prefixed<F> {
    inner: F,
    journal: bool,
}

impl<F> Prefixed<F> {
    pub fn new(inner: F, journal: bool) -> Self {
        Self { inner, journal }
    }
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.journal {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(journal: bool) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(Level::DEBUG)
            .event_format(Prefixed::new(
                tracing_subscriber::fmt::format()
                    .with_target(false)
                    .without_time(),
                journal,
            ))
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!(n = 1, "i");
            tracing::debug!("d");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn journal_lines_carry_the_syslog_priority_and_others_are_unchanged() {
        assert_eq!(
            lines(true),
            "<3>ERROR e\n<4> WARN w\n<6> INFO i n=1\n<7>DEBUG d\n"
        );
        assert_eq!(lines(false), "ERROR e\n WARN w\n INFO i n=1\nDEBUG d\n");
    }

    #[test]
    fn the_journal_stream_is_recognised_by_device_and_inode() {
        use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
        let path = std::env::temp_dir().join(format!("sg-journal-test-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let m = f.metadata().unwrap();
        let fd = f.as_raw_fd();
        assert!(is_stream(&format!("{}:{}", m.dev(), m.ino()), fd));
        assert!(!is_stream(&format!("{}:{}", m.dev(), m.ino() + 1), fd));
        assert!(!is_stream("garbage", fd));
        std::fs::remove_file(&path).unwrap();
    }
}
