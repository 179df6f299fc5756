//! `stewardctl logs` through the agent sessions of this replica.
//!
//! The admin API asks ([`LogRouter::open`]); the node's session loop sends
//! the agent a `LogRequest`; the agent's chunks come back through the same
//! session ([`LogRouter::deliver`]) to the admin stream. Dropping the admin
//! stream (stewardctl ended, Ctrl-C) sends the agent a `LogCancel`, and the
//! agent kills its `journalctl`.
//!
//! Only this replica's sessions are reachable here: a node served by
//! another replica is refused with that replica's id, and stewardctl asks
//! that one. Bounds: [`MAX_READERS`] log streams per replica, a bounded
//! queue per reader (a reader too slow for the journal loses lines, and is
//! told how many).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use steward_proto::domain::{CoordinatorMessage, LogChunk, LogQuery, NodeId};
use tokio::sync::mpsc;
use tokio_stream::Stream;

/// Log streams one replica serves at once.
pub const MAX_READERS: usize = 32;
/// Chunks waiting for a slow reader before lines are dropped.
const READER_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("node {0} has no session on this replica")]
    NotHere(NodeId),
    #[error("this replica already serves {MAX_READERS} log streams; try again later")]
    Busy,
    #[error("the session of node {0} is closing")]
    SessionGone(NodeId),
}

struct Reader {
    tx: mpsc::Sender<LogChunk>,
    dropped: u64,
}

/// Sessions that can carry log requests, and the readers waiting for
/// chunks.
#[derive(Default)]
pub struct LogRouter {
    next_id: AtomicU64,
    /// Node → (session id, the session's command queue).
    sessions: Mutex<HashMap<NodeId, (u64, mpsc::Sender<CoordinatorMessage>)>>,
    readers: Mutex<HashMap<u64, Reader>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a holder panicked; the maps stay whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogRouter {
    /// The session `session` of `node` takes commands on `commands`.
    pub fn attach(&self, node: &NodeId, session: u64, commands: mpsc::Sender<CoordinatorMessage>) {
        lock(&self.sessions).insert(node.clone(), (session, commands));
    }

    /// The session ended (a newer one of the same node stays attached).
    pub fn detach(&self, node: &NodeId, session: u64) {
        let mut sessions = lock(&self.sessions);
        if sessions.get(node).is_some_and(|(s, _)| *s == session) {
            sessions.remove(node);
        }
    }

    /// Starts reading `node`'s journal; the chunks arrive on the returned
    /// stream, which cancels the request when dropped.
    pub fn open(
        self: &std::sync::Arc<Self>,
        node: &NodeId,
        query: LogQuery,
    ) -> Result<LogStream, LogError> {
        let commands = lock(&self.sessions)
            .get(node)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| LogError::NotHere(node.clone()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(READER_QUEUE);
        {
            let mut readers = lock(&self.readers);
            if readers.len() >= MAX_READERS {
                return Err(LogError::Busy);
            }
            readers.insert(id, Reader { tx, dropped: 0 });
        }
        if commands
            .try_send(CoordinatorMessage::LogRequest { id, query })
            .is_err()
        {
            lock(&self.readers).remove(&id);
            return Err(LogError::SessionGone(node.clone()));
        }
        Ok(LogStream {
            id,
            rx,
            commands,
            router: self.clone(),
            done: false,
        })
    }

    /// A chunk from an agent. Unknown ids (a reader already gone) are
    /// dropped; a full reader queue drops the chunk's lines and counts them.
    pub fn deliver(&self, mut chunk: LogChunk) {
        let mut readers = lock(&self.readers);
        let Some(reader) = readers.get_mut(&chunk.id) else {
            return;
        };
        let marked = reader.dropped > 0 && chunk.lines.len() < steward_proto::domain::MAX_LOG_CHUNK;
        if marked {
            chunk.lines.insert(
                0,
                format!(
                    "…[{} lines dropped: the reader was too slow]",
                    reader.dropped
                ),
            );
        }
        match reader.tx.try_send(chunk) {
            Ok(()) if marked => reader.dropped = 0,
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(chunk)) => {
                reader.dropped += chunk.lines.len() as u64 - u64::from(marked);
            }
            Err(mpsc::error::TrySendError::Closed(chunk)) => {
                readers.remove(&chunk.id);
            }
        }
    }

    fn forget(&self, id: u64) {
        lock(&self.readers).remove(&id);
    }

    pub fn readers(&self) -> usize {
        lock(&self.readers).len()
    }
}

/// The chunks of one request; dropping it cancels the request at the agent.
pub struct LogStream {
    id: u64,
    rx: mpsc::Receiver<LogChunk>,
    commands: mpsc::Sender<CoordinatorMessage>,
    router: std::sync::Arc<LogRouter>,
    done: bool,
}

impl Stream for LogStream {
    type Item = LogChunk;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LogChunk>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => {
                if chunk.done {
                    self.done = true;
                }
                Poll::Ready(Some(chunk))
            }
            other => other,
        }
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.router.forget(self.id);
        if !self.done {
            // Best effort: a session whose queue is full or closed has its
            // readers ended with it by the agent.
            let _ = self
                .commands
                .try_send(CoordinatorMessage::LogCancel { id: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_stream::StreamExt;

    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).expect("id")
    }

    fn query() -> LogQuery {
        LogQuery::new("haproxy", 0, true, 10).expect("query")
    }

    #[tokio::test]
    async fn a_request_goes_to_the_session_and_its_chunks_come_back_until_cancelled() {
        let router = Arc::new(LogRouter::default());
        assert_eq!(
            router.open(&node("n1"), query()).err(),
            Some(LogError::NotHere(node("n1")))
        );
        let (tx, mut commands) = mpsc::channel(8);
        router.attach(&node("n1"), 7, tx);
        let mut stream = router.open(&node("n1"), query()).expect("open");
        let id = match commands.recv().await {
            Some(CoordinatorMessage::LogRequest { id, query: q }) => {
                assert_eq!(q, query());
                id
            }
            other => panic!("{other:?}"),
        };
        router.deliver(LogChunk {
            id,
            lines: vec!["a".into(), "b".into()],
            done: false,
            error: None,
        });
        // Another request's chunk does not reach this reader.
        router.deliver(LogChunk {
            id: id + 100,
            lines: vec!["x".into()],
            done: false,
            error: None,
        });
        assert_eq!(stream.next().await.expect("chunk").lines, ["a", "b"]);
        drop(stream);
        assert_eq!(router.readers(), 0);
        assert_eq!(
            commands.recv().await,
            Some(CoordinatorMessage::LogCancel { id })
        );
        // An old session's end leaves a newer one attached.
        let (tx2, _commands2) = mpsc::channel(8);
        router.attach(&node("n1"), 8, tx2);
        router.detach(&node("n1"), 7);
        assert!(router.open(&node("n1"), query()).is_ok());
        router.detach(&node("n1"), 8);
        assert!(router.open(&node("n1"), query()).is_err());
    }

    #[tokio::test]
    async fn a_slow_reader_loses_lines_and_is_told_how_many() {
        let router = Arc::new(LogRouter::default());
        let (tx, _commands) = mpsc::channel(8);
        router.attach(&node("n1"), 1, tx);
        let mut stream = router.open(&node("n1"), query()).expect("open");
        let id = 1;
        for i in 0..READER_QUEUE + 3 {
            router.deliver(LogChunk {
                id,
                lines: vec![format!("line {i}")],
                done: false,
                error: None,
            });
        }
        for _ in 0..READER_QUEUE {
            stream.next().await.expect("chunk");
        }
        router.deliver(LogChunk {
            id,
            lines: vec!["after".into()],
            done: true,
            error: None,
        });
        let last = stream.next().await.expect("chunk");
        assert_eq!(
            last.lines,
            ["…[3 lines dropped: the reader was too slow]", "after"]
        );
        assert!(stream.next().await.is_none(), "done ends the stream");
    }
}
