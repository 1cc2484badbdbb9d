//! Callers by key: `Authorization: Bearer <key>`, whose SHA-256 is compared
//! in constant time with every configured `key_sha256`.

use std::sync::Arc;

use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::policy::Policy;
use super::{Caller, Identified, Method, Presented};
use crate::config::KeyDigest;
use crate::domain::Proof;

/// The clients that have a key.
pub(super) struct Keys {
    keyed: Vec<(Arc<Policy>, KeyDigest)>,
}

impl Keys {
    pub(super) fn new(keyed: Vec<(Arc<Policy>, KeyDigest)>) -> Self {
        Self { keyed }
    }
}

impl Method for Keys {
    fn identify<'a>(&'a self, presented: &'a Presented<'a>) -> Identified<'a> {
        let Some(bearer) = &presented.bearer else {
            return Identified::Now(Ok(None));
        };
        // Every digest is compared, so timing does not tell which (or whether) one matched.
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, (_, digest)) in self.keyed.iter().enumerate() {
            let matches = digest.as_bytes().ct_eq(bearer.digest.as_bytes());
            index.conditional_assign(&(i as u32), matches);
            found |= matches;
        }
        let caller = bool::from(found).then(|| Caller {
            policy: self.keyed[index as usize].0.clone(),
            proof: Proof::Key,
        });
        Identified::Now(Ok(caller))
    }
}
