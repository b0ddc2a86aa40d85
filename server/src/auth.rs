//! Optional bearer-token authentication of the reward service (health, reflection and metrics
//! stay open for probes and scrapers).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::error::ServiceError;

/// Checks `authorization: Bearer <token>` in constant time: both sides are hashed first, so
/// neither the content nor the length of the expected token leaks through timing.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BearerAuth({})", if self.expected.is_some() { "on" } else { "off" })
    }
}

impl BearerAuth {
    /// Requires `token` when given; lets everything through otherwise.
    pub fn new(token: Option<&str>) -> Self {
        BearerAuth { expected: token.map(|t| Sha256::digest(t.as_bytes()).into()) }
    }

    /// Checks the `authorization` entry of a request's metadata.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), ServiceError> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let given = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(|t| Sha256::digest(t.as_bytes()));
        match given {
            Some(g) if bool::from(g.as_slice().ct_eq(expected)) => Ok(()),
            Some(_) => Err(ServiceError::Unauthenticated("wrong bearer token".into())),
            None => Err(ServiceError::Unauthenticated("this server requires `authorization: Bearer <token>`".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Request;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens() {
        let a = BearerAuth::new(Some("s3cret"));
        assert!(a.check(req(Some("Bearer s3cret")).metadata()).is_ok());
        assert_eq!(a.check(req(Some("Bearer s3cre")).metadata()).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(a.check(req(None).metadata()).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(BearerAuth::new(None).check(req(None).metadata()).is_ok());
    }
}
