//! One write instead of two at the start of an HTTP/2 server connection.
//!
//! An HTTP/2 server flushes its SETTINGS before it reads anything (h2's
//! server handshake), then, once it has read the client's SETTINGS,
//! flushes their acknowledgement and its connection WINDOW_UPDATE. The
//! client sends its preface with its TLS Finished, so the two flushes come
//! in the same poll of the connection, microseconds apart: two TLS records,
//! two `writev`s, two loopback transmits. [`HoldFirstFlush`] keeps the
//! first flush's bytes until the second flush, so both leave in one write.
//!
//! Held bytes are never stuck:
//! - the second flush, a shutdown, or writing past [`MAX_HELD`] sends them;
//! - a read that would block while a flush is held wakes the task and
//!   returns `Pending`; the next read sends them before reading. An HTTP/2
//!   connection flushes after every read that blocks, so in practice the
//!   second flush comes in that same poll.
//!
//! After the first real write the wrapper only passes calls through.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most held back; a larger first write goes out at once. HTTP/2's
/// SETTINGS, its acknowledgement and a WINDOW_UPDATE are under 100 bytes.
pub const MAX_HELD: usize = 4096;

/// Holds back the first flush of `io` until the second one (module docs).
#[derive(Debug)]
pub struct HoldFirstFlush<T> {
    io: T,
    /// `None` once the held bytes are written: everything passes through.
    held: Option<Held>,
}

#[derive(Debug, Default)]
struct Held {
    buf: Vec<u8>,
    /// How much of `buf` has reached `io`.
    sent: usize,
    /// A flush was asked for and held back.
    flush_held: bool,
    /// A read blocked with a flush held, and the task was woken for it.
    woken: bool,
}

impl<T> HoldFirstFlush<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            held: Some(Held::default()),
        }
    }
}

impl<T: AsyncWrite + Unpin> HoldFirstFlush<T> {
    /// Writes what is held; passes through from then on.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(held) = &mut self.held {
            while held.sent < held.buf.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &held.buf[held.sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                held.sent += n;
            }
            self.held = None;
        }
        Poll::Ready(Ok(()))
    }

    /// Keeps `bufs` if they fit; `false` when they must pass through.
    fn hold(&mut self, bufs: &[IoSlice<'_>]) -> bool {
        let Some(held) = &mut self.held else {
            return false;
        };
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if held.sent > 0 || held.buf.len() + len > MAX_HELD {
            return false;
        }
        for b in bufs {
            held.buf.extend_from_slice(b);
        }
        true
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HoldFirstFlush<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.as_ref().is_some_and(|h| h.woken) {
            // Woken for this: send what is held, then read. A write that
            // cannot go yet does not hold up the read; the next flush
            // finishes it.
            if let Poll::Ready(Err(e)) = this.poll_release(cx) {
                return Poll::Ready(Err(e));
            }
            if this.held.is_none() {
                let _ = Pin::new(&mut this.io).poll_flush(cx)?;
            }
        }
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_pending()
            && let Some(held) = &mut this.held
            && held.flush_held
            && !held.woken
        {
            held.woken = true;
            cx.waker().wake_by_ref();
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HoldFirstFlush<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold(&[IoSlice::new(buf)]) {
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold(bufs) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(held) = &mut this.held
            && !held.flush_held
            && held.sent == 0
        {
            held.flush_held = true;
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use super::*;

    /// An `io` that records each write and has nothing to read yet.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn with_cx<R>(wakes: &Arc<Wakes>, f: impl FnOnce(&mut Context<'_>) -> R) -> R {
        let waker = Waker::from(wakes.clone());
        f(&mut Context::from_waker(&waker))
    }

    fn write(io: &mut HoldFirstFlush<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        let n = Pin::new(&mut *io).poll_write(cx, bytes);
        assert!(matches!(n, Poll::Ready(Ok(n)) if n == bytes.len()));
    }

    fn flush(io: &mut HoldFirstFlush<Recorder>, cx: &mut Context<'_>) {
        assert!(matches!(
            Pin::new(&mut *io).poll_flush(cx),
            Poll::Ready(Ok(()))
        ));
    }

    fn read(io: &mut HoldFirstFlush<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut space = [0u8; 8];
        Pin::new(&mut *io).poll_read(cx, &mut ReadBuf::new(&mut space))
    }

    /// A wrapper that was written `bytes` and flushed once (held).
    fn flushed_once(bytes: &[u8]) -> (Arc<Wakes>, HoldFirstFlush<Recorder>) {
        let wakes = Arc::new(Wakes::default());
        let mut io = HoldFirstFlush::new(Recorder::default());
        with_cx(&wakes, |cx| {
            write(&mut io, cx, bytes);
            flush(&mut io, cx);
        });
        assert!(io.io.writes.is_empty(), "the first flush is held");
        (wakes, io)
    }

    #[test]
    fn two_flushes_leave_in_one_write_and_then_writes_pass_through() {
        let (wakes, mut io) = flushed_once(b"settings");
        with_cx(&wakes, |cx| {
            write(&mut io, cx, b"+ack");
            flush(&mut io, cx);
            assert_eq!(io.io.writes, vec![b"settings+ack".to_vec()]);
            write(&mut io, cx, b"response");
            assert_eq!(
                io.io.writes.len(),
                2,
                "after the release, writes go through"
            );
            flush(&mut io, cx);
        });
        assert_eq!(io.io.flushes, 2);
    }

    #[test]
    fn a_read_that_blocks_wakes_the_task_and_the_next_read_sends_what_is_held() {
        let (wakes, mut io) = flushed_once(b"settings");
        // A peer that has sent nothing: the read blocks.
        with_cx(&wakes, |cx| assert!(read(&mut io, cx).is_pending()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken to send");
        assert!(io.io.writes.is_empty());
        with_cx(&wakes, |cx| assert!(read(&mut io, cx).is_pending()));
        assert_eq!(io.io.writes, vec![b"settings".to_vec()]);
        assert_eq!(io.io.flushes, 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken once only");
    }

    #[test]
    fn a_blocked_read_without_a_held_flush_wakes_nothing() {
        let wakes = Arc::new(Wakes::default());
        let mut io = HoldFirstFlush::new(Recorder::default());
        with_cx(&wakes, |cx| {
            write(&mut io, cx, b"not yet flushed");
            assert!(read(&mut io, cx).is_pending());
        });
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn shutdown_sends_what_is_held_first() {
        let (wakes, mut io) = flushed_once(b"goaway");
        with_cx(&wakes, |cx| {
            assert!(matches!(
                Pin::new(&mut io).poll_shutdown(cx),
                Poll::Ready(Ok(()))
            ));
        });
        assert_eq!(io.io.writes, vec![b"goaway".to_vec()]);
        assert!(io.io.shut);
    }

    #[test]
    fn more_than_the_limit_is_not_held() {
        let wakes = Arc::new(Wakes::default());
        let mut io = HoldFirstFlush::new(Recorder::default());
        let big = vec![7u8; MAX_HELD];
        with_cx(&wakes, |cx| {
            write(&mut io, cx, b"first");
            write(&mut io, cx, &big);
        });
        assert_eq!(io.io.writes, vec![b"first".to_vec(), big]);
    }
}
