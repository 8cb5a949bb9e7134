//! The store on its own thread, so that the event loop goes on receiving, answering reads and
//! pushing while a batch is being made durable (an `fsync` costs 0.1-1 ms here, a fan-out turn
//! less). The core allows one batch in flight; the next one fills meanwhile (group commit).
//! Results come back through a channel, and the loop is woken with its `mio::Waker`.

use mio::Waker;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use udpmsg::store::{Snapshot, Store, StoreError, Write};

pub enum Job {
    /// Make batch `n` durable.
    Commit(u64, Vec<Write>),
    /// Look for changes made by `udpmsgd user ...` beside the daemon.
    CheckExternal,
}

pub enum Done {
    Committed {
        n: u64,
        writes: usize,
    },
    /// Nothing of batch `n` is stored; `durable` is the state as it is (or why it cannot be read).
    Failed {
        n: u64,
        writes: usize,
        error: StoreError,
        durable: Result<Snapshot, StoreError>,
    },
    /// The state after an outside change, `None` when there was none.
    External(Result<Option<Snapshot>, StoreError>),
}

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
            for job in job_rx {
                let done = match job {
                    Job::Commit(n, writes) => match store.commit(&writes) {
                        Ok(()) => Done::Committed { n, writes: writes.len() },
                        Err(error) => Done::Failed { n, writes: writes.len(), error, durable: store.load() },
                    },
                    Job::CheckExternal => Done::External(match store.changed_externally() {
                        Ok(false) => Ok(None),
                        Ok(true) => store.load().map(Some),
                        Err(e) => Err(e),
                    }),
                };
                if done_tx.send(done).is_err() {
                    return;
                }
                let _ = waker.wake();
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
