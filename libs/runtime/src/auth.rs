//! The queue token as it travels: `authorization: Bearer <token>` metadata.

use tonic::metadata::MetadataMap;

use crate::ApiError;

/// Reads the bearer token of a call. UNAUTHENTICATED / MISSING_TOKEN when there is none,
/// INVALID_ARGUMENT / MALFORMED_TOKEN when the header is not `Bearer <token>`. Whether the
/// token is real is the queue service's to say (its ValidateToken).
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, ApiError> {
    let Some(value) = metadata.get("authorization") else {
        return Err(ApiError::new(
            tonic::Code::Unauthenticated,
            "MISSING_TOKEN",
            "this call needs a queue token as `authorization: Bearer <token>` metadata",
        ));
    };
    let malformed = || {
        ApiError::new(
            tonic::Code::InvalidArgument,
            "MALFORMED_TOKEN",
            "the authorization metadata must be `Bearer <token>`",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}
