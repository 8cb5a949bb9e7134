//! The password worker pool: argon2 runs here, never on the event loop. Results come back
//! through a channel, and the loop is woken with its `mio::Waker`.

use mio::Waker;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use udpmsg::password::{PasswordJob, PasswordOutcome};

pub struct PasswordPool {
    jobs: Option<Sender<PasswordJob>>,
    results: Receiver<(u64, PasswordOutcome)>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl PasswordPool {
    /// `n` threads. The queue itself is unbounded here because the core bounds the number of
    /// jobs outstanding (`password_queue`).
    pub fn new(n: usize, waker: Arc<Waker>) -> std::io::Result<Self> {
        let (job_tx, job_rx) = mpsc::channel::<PasswordJob>();
        let (res_tx, res_rx) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::new();
        for i in 0..n {
            let job_rx = job_rx.clone();
            let res_tx = res_tx.clone();
            let waker = waker.clone();
            threads.push(thread::Builder::new().name(format!("password-{i}")).spawn(move || loop {
                let job = {
                    let Ok(rx) = job_rx.lock() else { return };
                    match rx.recv() {
                        Ok(job) => job,
                        Err(_) => return, // pool dropped
                    }
                };
                if res_tx.send(job.run()).is_err() {
                    return;
                }
                let _ = waker.wake();
            })?);
        }
        Ok(PasswordPool { jobs: Some(job_tx), results: res_rx, threads })
    }

    pub fn submit(&self, job: PasswordJob) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send(job);
        }
    }

    /// Finished jobs, without blocking.
    pub fn results(&self) -> impl Iterator<Item = (u64, PasswordOutcome)> + '_ {
        self.results.try_iter()
    }
}

impl Drop for PasswordPool {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
