//! Input checks shared by every service. Each failure is an [`ApiError`] naming the field, so a
//! client sees INVALID_ARGUMENT with reason INVALID_FIELD and the field in the ErrorInfo
//! metadata and in a `google.rpc.BadRequest` field violation.

use crate::ApiError;

/// Longest id the services accept (concert, user, request ids ...).
pub const MAX_ID_LEN: usize = 64;

/// Checks an id: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9._:@-]`. Ids end up in URLs,
/// logs and keys, so anything outside that set is refused rather than escaped everywhere.
pub fn id<'a>(field: &'static str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ApiError::invalid_field(
            field,
            format!(
                "{field} must be at most {MAX_ID_LEN} characters, got {}",
                value.len()
            ),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} may hold only letters, digits and . _ : @ -, found {bad:?}"),
        ));
    }
    Ok(value)
}

/// Checks the length of a repeated field: 1 to `max` `items` (the noun in the message).
pub fn item_count(
    field: &'static str,
    count: usize,
    max: usize,
    items: &str,
) -> Result<(), ApiError> {
    if count == 0 || count > max {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} must hold 1 to {max} {items}"),
        ));
    }
    Ok(())
}

/// Checks a page size: 0 means `default`, otherwise 1 to `max`.
pub fn page_size(value: i32, default: i64, max: i64) -> Result<i64, ApiError> {
    match i64::from(value) {
        0 => Ok(default),
        size if (1..=max).contains(&size) => Ok(size),
        size => Err(ApiError::invalid_field(
            "page_size",
            format!("page_size must be between 1 and {max} (or 0 for {default}), got {size}"),
        )),
    }
}

/// Seals the cursor of a listing's next page to the filter it was listed by (the user id):
/// a page token continues the listing that returned it and no other (AIP-158). Unsealed, a
/// token passed with another user's id answered OK with a page cut short at the first user's
/// position. The fingerprint is FNV-1a, fixed across builds (std's hasher is not, and during
/// a rollout two builds serve the pages of one listing).
pub fn seal_page_token(cursor: &str, scope: &str) -> String {
    format!("{cursor}~{:08x}", fingerprint(scope))
}

/// The cursor inside a token that [`seal_page_token`] sealed for `scope`; None for anything
/// else, a token sealed for another scope included.
pub fn open_page_token<'a>(token: &'a str, scope: &str) -> Option<&'a str> {
    let (cursor, seal) = token.rsplit_once('~')?;
    (seal == format!("{:08x}", fingerprint(scope))).then_some(cursor)
}

/// 32-bit FNV-1a: enough to tell one listing's filter from another's. It is not a secret;
/// the listings filter by user in SQL whatever the token says.
fn fingerprint(scope: &str) -> u32 {
    scope.bytes().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(id("user_id", "fan-42@example.com").is_ok());
        assert_eq!(id("user_id", "").unwrap_err().reason(), "INVALID_FIELD");
        assert!(id("user_id", &"x".repeat(MAX_ID_LEN)).is_ok());
        assert!(id("user_id", &"x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(id("user_id", "a b").is_err());
        assert!(id("user_id", "ünï").is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0, 20, 100).unwrap(), 20);
        assert_eq!(page_size(100, 20, 100).unwrap(), 100);
        assert!(page_size(101, 20, 100).is_err());
        assert!(page_size(-1, 20, 100).is_err());
    }

    #[test]
    fn page_tokens_open_only_for_their_scope() {
        let token = seal_page_token("e42", "fan-1");
        assert_eq!(open_page_token(&token, "fan-1"), Some("e42"));
        assert_eq!(open_page_token(&token, "fan-2"), None);
        assert_eq!(open_page_token("e42", "fan-1"), None, "unsealed");
        assert_eq!(open_page_token(&format!("{token}0"), "fan-1"), None);
        // Published FNV-1a test vectors: the seal must not change between builds.
        assert_eq!(fingerprint(""), 0x811c_9dc5);
        assert_eq!(fingerprint("a"), 0xe40c_292c);
        assert_eq!(fingerprint("foobar"), 0xbf9c_f968);
    }
}
