//! The password worker pool: argon2 runs here, never on the event loop. Results come back
//! through a channel, and the loop is woken with its `mio::Waker`.
//!
//! The workers run at a lower scheduling priority (nice +`WORKER_NICE`) than the loop: on a
//! machine with as many cores as workers, a login storm at argon2's default cost would otherwise
//! take the loop's CPU, and every established session's traffic would wait behind the hashing.
//! Logins are what waits instead (their queue is bounded by `password_queue`).

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
            threads.push(thread::Builder::new().name(format!("password-{i}")).spawn(move || {
                lower_priority();
                loop {
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
                }
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

/// How much less CPU priority a password worker has than the event loop.
const WORKER_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority (on Linux `setpriority` with `PRIO_PROCESS` and a
/// thread id applies to that thread only). Failure only costs fairness: logged, not fatal.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = nix::unistd::gettid().as_raw() as libc::id_t;
        // Relative to the daemon's own niceness (getpriority can return -1 legitimately; the
        // worst case of misreading it is a nice of 9).
        // SAFETY: getpriority and setpriority take plain integers and touch no memory of ours.
        let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (current + WORKER_NICE).min(19)) };
        if r != 0 {
            log::warn!("cannot lower the password workers' priority: {}", std::io::Error::last_os_error());
        }
    }
}
