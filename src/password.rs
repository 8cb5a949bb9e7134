//! Password hashing with argon2id, as jobs the core hands out and the shell runs off the event
//! loop (a worker pool in the daemon, inline in simulations).
//!
//! The core never hashes itself: a hash costs tens of milliseconds by design, which would stall
//! every other session. It emits a [`PasswordJob`], and the shell returns the
//! [`PasswordOutcome`] through [`crate::server::Server::on_password_done`].

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use std::fmt;

/// argon2id cost parameters for new hashes. Verification uses the parameters stored in the
/// hash itself, so changing these affects only new and changed passwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl HashParams {
    /// Cheap parameters for tests and simulations only.
    pub const TEST: HashParams = HashParams { memory_kib: 8, iterations: 1, parallelism: 1 };
}

/// The work itself. `Debug` never shows the password.
pub enum JobKind {
    Hash { password: String, params: HashParams },
    Verify { password: String, hash: String },
}

impl fmt::Debug for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobKind::Hash { params, .. } => write!(f, "Hash({params:?})"),
            JobKind::Verify { .. } => write!(f, "Verify"),
        }
    }
}

#[derive(Debug)]
pub struct PasswordJob {
    pub id: u64,
    pub kind: JobKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordOutcome {
    /// A PHC string, or `None` if hashing failed (reported to the user as storage trouble).
    Hashed(Option<String>),
    Verified(bool),
}

impl PasswordJob {
    /// Runs the job; takes tens of milliseconds at production parameters.
    pub fn run(self) -> (u64, PasswordOutcome) {
        let outcome = match self.kind {
            JobKind::Hash { password, params } => PasswordOutcome::Hashed(hash(&password, params)),
            JobKind::Verify { password, hash } => PasswordOutcome::Verified(verify(&password, &hash)),
        };
        (self.id, outcome)
    }
}

pub fn hash(password: &str, p: HashParams) -> Option<String> {
    let params = Params::new(p.memory_kib, p.iterations, p.parallelism, None).ok()?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    argon.hash_password(password.as_bytes()).ok().map(|h| h.to_string())
}

pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("s3cret", HashParams::TEST).unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(!h.contains("s3cret"));
        assert!(verify("s3cret", &h));
        assert!(!verify("s3cres", &h));
        assert!(!verify("s3cret", "not a hash"));
        // Same password, different salt.
        assert_ne!(h, hash("s3cret", HashParams::TEST).unwrap());
    }
}
