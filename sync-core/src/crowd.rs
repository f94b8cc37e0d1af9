//! A crowd is load, not failure: how the leader answers many devices at once.
//!
//! Two rules. Every transaction that may write begins with [`begin_write`], so on SQLite
//! it waits its turn for the write lock instead of failing (`SQLITE_BUSY`) when another
//! connection wrote between its read and its write. And reads that many callers ask for
//! at once are made once ([`Coalescer`]).
//!
//! A thousand followers learn of a new entry together and pull together, each asking for
//! the same range of the log and for its own admission. Asked one by one, every question
//! is a database round trip (on SQLite, a hand-off to a worker thread and back). Here
//! callers queue their keys; one task reads every key queued so far in one round, answers
//! them all, and goes on while keys keep arriving. Each answer comes from a round that
//! began after its caller asked, so it is as fresh as a read of the caller's own: nothing
//! committed before a request is missed by its answer.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbErr, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};
use tokio::sync::oneshot;

/// Begins a transaction that will write (see `Library::begin_write`): on SQLite it takes
/// the write lock at BEGIN, waiting its turn under busy_timeout. Every transaction that
/// may write begins here. A deferred one that has read fails at its first write, at once
/// and without retrying, with `SQLITE_BUSY` (code 5: another connection holds the write
/// lock) or `SQLITE_BUSY_SNAPSHOT` (code 517: another connection committed since the read).
pub(crate) async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    let options = TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    };
    db.begin_with_options(options).await
}

/// Keys waiting for the next round, and whether a round task runs.
#[derive(Debug)]
struct Queue<K, V> {
    waiting: HashMap<K, Vec<oneshot::Sender<V>>>,
    running: bool,
}

/// Gathers concurrent reads of keys `K` into rounds (see the module docs).
#[derive(Debug)]
pub(crate) struct Coalescer<K, V> {
    queue: Mutex<Queue<K, V>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            queue: Mutex::new(Queue {
                waiting: HashMap::new(),
                running: false,
            }),
        }
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    fn queue(&self) -> MutexGuard<'_, Queue<K, V>> {
        // Plain data, never left half-updated by a panic.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key`, from the next round. `read` answers a round's keys; the round
    /// task uses the `read` of the caller that started it for every round it runs, so
    /// every caller must pass an equivalent one. `None` when the round lost the key (its
    /// `read` left it out, or the runtime is shutting down).
    pub(crate) async fn get<R, Fut>(self: &Arc<Self>, key: K, read: R) -> Option<V>
    where
        R: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HashMap<K, V>> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut queue = self.queue();
            queue.waiting.entry(key).or_default().push(answer);
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            // A task of its own: a caller that gives up (its request cancelled) must not
            // strand the callers queued behind it.
            tokio::spawn(Arc::clone(self).run(read));
        }
        answered.await.ok()
    }

    async fn run<R, Fut>(self: Arc<Self>, read: R)
    where
        R: Fn(Vec<K>) -> Fut,
        Fut: Future<Output = HashMap<K, V>>,
    {
        let mut guard = RoundTask {
            coalescer: &self,
            ended: false,
        };
        loop {
            let round = {
                let mut queue = self.queue();
                if queue.waiting.is_empty() {
                    // Under the lock: a caller queueing after this starts a new task.
                    queue.running = false;
                    guard.ended = true;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let mut values = read(round.keys().cloned().collect()).await;
            for (key, answers) in round {
                if let Some(value) = values.remove(&key) {
                    for answer in answers {
                        // A caller that gave up is fine.
                        let _ = answer.send(value.clone());
                    }
                }
            }
        }
    }
}

/// Ends a round task that did not end normally (a `read` that panicked, a runtime
/// shutting down): the callers queued meanwhile get `None` rather than waiting forever,
/// and the next caller starts a new task.
struct RoundTask<'a, K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    coalescer: &'a Coalescer<K, V>,
    ended: bool,
}

impl<K, V> Drop for RoundTask<'_, K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    fn drop(&mut self) {
        if !self.ended {
            let mut queue = self.coalescer.queue();
            queue.waiting.clear();
            queue.running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_asking_together_each_get_their_key() {
        let coalescer = Arc::new(Coalescer::<u32, u32>::default());
        let mut calls = Vec::new();
        for key in 0..100u32 {
            let coalescer = Arc::clone(&coalescer);
            calls.push(tokio::spawn(async move {
                coalescer
                    .get(key % 10, |keys: Vec<u32>| async move {
                        keys.into_iter().map(|k| (k, k * 2)).collect()
                    })
                    .await
            }));
        }
        for (key, call) in (0..100u32).zip(calls) {
            assert_eq!(call.await.expect("caller"), Some((key % 10) * 2));
        }
    }

    #[tokio::test]
    async fn a_read_that_panics_fails_its_round_and_the_next_round_runs() {
        let coalescer = Arc::new(Coalescer::<u32, u32>::default());
        let failed = coalescer
            .get(1, |_keys: Vec<u32>| async { panic!("a read that panics") })
            .await;
        assert_eq!(failed, None);
        let value = coalescer
            .get(2, |keys: Vec<u32>| async move {
                keys.into_iter().map(|k| (k, k + 1)).collect()
            })
            .await;
        assert_eq!(value, Some(3));
    }

    #[tokio::test]
    async fn a_key_the_read_leaves_out_is_none() {
        let coalescer = Arc::new(Coalescer::<u32, u32>::default());
        let value = coalescer
            .get(1, |_keys: Vec<u32>| async { HashMap::new() })
            .await;
        assert_eq!(value, None);
    }
}
