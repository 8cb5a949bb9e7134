//! The store on its own thread, so that the event loop goes on receiving, answering and pushing
//! while a batch is being made durable (an `fsync` costs 0.1-1 ms here) or data is read. Jobs are
//! served in the order they were submitted, so a read submitted after a commit sees it. The core
//! allows one batch in flight; the next one fills meanwhile (group commit). Results come back
//! through a channel, and the loop is woken with its `mio::Waker`. Once it has had nothing to do
//! for [`UPKEEP_AFTER`], the thread does the store's background upkeep ([`Store::maintain`]:
//! collecting messages no inbox holds) in slices of [`UPKEEP_SLICE`], looking for jobs between
//! them; under steady load upkeep waits for a lull, so it never delays a commit or a read by more
//! than one slice.
//!
//! Reads that are not urgent (for logins and registrations, and the catch-up of sessions brought
//! back at start) wait in a lane of their own, served when nothing else waits: a login storm's
//! reads do not delay a logged-in user's. A read may run later than it was submitted (after later
//! commits: it then sees more, which is harmless), never earlier.

use mio::Waker;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use udpmsg::server::ReadJob;
use udpmsg::store::{CommitOutcome, ReadResult, Startup, Store, StoreError, Write};

pub enum Job {
    /// Make batch `n` durable.
    Commit(u64, Vec<Write>),
    /// Answer a read.
    Read(ReadJob),
    /// Look for changes made by `udpmsgd user ...` beside the daemon.
    CheckExternal,
    /// Write what the store keeps in memory only (at a clean stop).
    Flush,
}

pub enum Done {
    Committed {
        n: u64,
        writes: usize,
        /// What the commit learned for the core (shared stores).
        outcome: CommitOutcome,
    },
    /// Nothing of batch `n` is stored; `durable` is the state as it is (or why it cannot be read).
    /// `survivable`: the store reconnects by itself, so an unreadable state is no reason to stop.
    Failed {
        n: u64,
        writes: usize,
        error: StoreError,
        durable: Result<Startup, StoreError>,
        survivable: bool,
    },
    Read {
        id: u64,
        result: Result<ReadResult, StoreError>,
    },
    /// The state after an outside change, `None` when there was none.
    External(Result<Option<Startup>, StoreError>),
    Flushed(Result<(), StoreError>),
}

/// One slice of background upkeep; how long the store must have been idle before upkeep runs;
/// how long it waits for a job when upkeep has nothing to do.
const UPKEEP_SLICE: Duration = Duration::from_millis(1);
const UPKEEP_AFTER: Duration = Duration::from_millis(50);
const UPKEEP_IDLE: Duration = Duration::from_millis(250);

pub struct StoreThread {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StoreThread {
    pub fn spawn(mut store: Box<dyn Store + Send>, waker: Arc<Waker>) -> std::io::Result<Self> {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = thread::Builder::new().name("store".into()).spawn(move || {
            // Whether upkeep has more to do, and when the last job came.
            let mut upkeep = true;
            let mut last_job = Instant::now();
            let mut later: VecDeque<ReadJob> = VecDeque::new();
            loop {
                // Everything submitted so far, urgent work first.
                let job = match job_rx.try_recv() {
                    Ok(Job::Read(r)) if !r.urgent => {
                        later.push_back(r);
                        continue;
                    }
                    Ok(job) => Some(job),
                    Err(mpsc::TryRecvError::Empty) => later.pop_front().map(Job::Read),
                    Err(mpsc::TryRecvError::Disconnected) => return,
                };
                let idle_for = last_job.elapsed();
                let wait = match (upkeep, idle_for >= UPKEEP_AFTER) {
                    (true, true) => Duration::ZERO,
                    (true, false) => UPKEEP_AFTER - idle_for,
                    (false, _) => UPKEEP_IDLE,
                };
                let job = match job {
                    Some(job) => job,
                    None => match job_rx.recv_timeout(wait) {
                        Ok(Job::Read(r)) if !r.urgent => {
                            later.push_back(r);
                            continue;
                        }
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) if last_job.elapsed() < UPKEEP_AFTER => continue,
                        Err(RecvTimeoutError::Timeout) => {
                            upkeep = match store.maintain(UPKEEP_SLICE) {
                                Ok(more) => more,
                                Err(e) => {
                                    log::warn!("storage upkeep: {e}");
                                    false
                                }
                            };
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    },
                };
                last_job = Instant::now();
                let committed = matches!(job, Job::Commit(..));
                let done = match job {
                    Job::Commit(n, writes) => {
                        upkeep = true;
                        match store.commit(&writes) {
                            Ok(()) => {
                                Done::Committed { n, writes: writes.len(), outcome: store.commit_outcome() }
                            }
                            Err(error) => Done::Failed {
                                n,
                                writes: writes.len(),
                                error,
                                durable: store.load(),
                                survivable: store.survives_outages(),
                            },
                        }
                    }
                    Job::Read(r) => Done::Read { id: r.id, result: store.read(&r.read) },
                    Job::CheckExternal => Done::External(match store.changed_externally() {
                        Ok(false) => Ok(None),
                        Ok(true) => store.load().map(Some),
                        Err(e) => Err(e),
                    }),
                    Job::Flush => Done::Flushed(store.flush()),
                };
                let ok = matches!(done, Done::Committed { .. });
                if done_tx.send(done).is_err() {
                    return;
                }
                let _ = waker.wake();
                if committed && ok {
                    // While the loop releases what waited on the commit.
                    if let Err(e) = store.after_commit() {
                        log::warn!("storage upkeep after a commit: {e}");
                    }
                }
            }
        })?;
        Ok(StoreThread { jobs: Some(job_tx), done: done_rx, thread: Some(thread) })
    }

    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send(job);
        }
    }

    /// A finished job, without blocking. An error if the thread is gone (it panicked): the
    /// daemon must stop rather than hold every reply for a commit that never comes.
    pub fn try_done(&self) -> Result<Option<Done>, String> {
        match self.done.try_recv() {
            Ok(done) => Ok(Some(done)),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err("the store thread stopped unexpectedly".into()),
        }
    }

    /// The next finished job, waiting for it (at shutdown). `None` if the thread is gone.
    pub fn wait(&self) -> Option<Done> {
        self.done.recv().ok()
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
