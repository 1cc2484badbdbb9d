//! Turns a raw query string into an `Identity`: exactly one identity form,
//! no repeated or unknown parameters.
//!
//! Values are percent-decoded only; a literal `+` stays `+`, because it is
//! common in e-mail local parts and a space is never valid in any parameter.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::domain::{Email, Identity, InvalidInput, UserId, UserType};
use crate::http::error::ApiError;

/// Names the customer-id parameter: `user_id` on `/v1`, `userId` on the drop-in route.
#[derive(Debug, Clone, Copy)]
pub struct CustomerParam(pub &'static str);

pub const V1: CustomerParam = CustomerParam("user_id");
pub const VENDOR: CustomerParam = CustomerParam("userId");

/// Parses the query of a token request.
pub fn identity(raw: Option<&str>, customer: CustomerParam) -> Result<Identity, ApiError> {
    let allowed = ["email", "type", customer.0];
    let mut values: [Option<Cow<'_, str>>; 3] = [None, None, None];
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name).map_err(|_| unknown(customer, ""))?;
        let Some(slot) = allowed.iter().position(|a| *a == name) else {
            return Err(unknown(customer, &name));
        };
        let value = decode(value).map_err(|_| {
            ApiError::BadRequest(format!(
                "{}: is not valid percent-encoded UTF-8",
                allowed[slot]
            ))
        })?;
        if values[slot].replace(value).is_some() {
            return Err(ApiError::BadRequest(format!(
                "{}: must be given once, not repeated",
                allowed[slot]
            )));
        }
    }
    let [email, user_type, user_id] = values;
    match (email, user_type, user_id) {
        (Some(email), Some(user_type), None) => Ok(Identity::TeamMember {
            email: Email::parse(&email)?,
            user_type: UserType::parse(&user_type)?,
        }),
        (None, None, Some(user_id)) => UserId::parse(&user_id)
            .map(Identity::Customer)
            .map_err(|e| InvalidInput::new(customer.0, e.reason).into()),
        (None, None, None) => Err(ApiError::BadRequest(format!(
            "email and type (a team member), or {} (a customer), is required",
            customer.0
        ))),
        (Some(_), None, None) => Err(ApiError::BadRequest(
            "type: is required with email; one of AGENT, CUSTOM_USER, CUSTOMER".into(),
        )),
        (None, Some(_), None) => Err(ApiError::BadRequest("email: is required with type".into())),
        (_, _, Some(_)) => Err(ApiError::BadRequest(format!(
            "give either email and type, or {}, not both",
            customer.0
        ))),
    }
}

fn decode(raw: &str) -> Result<Cow<'_, str>, std::str::Utf8Error> {
    // Names and most values have nothing to decode: one fast scan says so.
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    percent_decode_str(raw).decode_utf8()
}

/// Longest unknown parameter name a detail repeats.
const NAMED_UNKNOWN_CHARS: usize = 32;

/// Names the unknown parameter when it is a plain name (letters, digits,
/// `_ . -`, up to 32), so a caller sees its typo; anything else is not
/// echoed back.
fn unknown(customer: CustomerParam, name: &str) -> ApiError {
    let plain = !name.is_empty()
        && name.len() <= NAMED_UNKNOWN_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    let named = if plain {
        format!("{name}: is an unknown query parameter")
    } else {
        "unknown query parameter".to_owned()
    };
    ApiError::BadRequest(format!(
        "{named}; the allowed parameters are email, type and {}",
        customer.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(raw: &str) -> String {
        match identity(Some(raw), V1) {
            Err(ApiError::BadRequest(d)) => d,
            other => panic!("{raw}: expected 400, got {other:?}"),
        }
    }

    #[test]
    fn team_member_and_customer_forms_parse() {
        let id = identity(Some("email=a%2Bb%40Example.com&type=agent"), V1).unwrap();
        let Identity::TeamMember { email, user_type } = id else {
            panic!("not a team member")
        };
        assert_eq!(email.as_str(), "a+b@example.com");
        assert_eq!(user_type, UserType::Agent);
        let id = identity(Some("userId=abc_1"), VENDOR).unwrap();
        assert!(matches!(id, Identity::Customer(u) if u.as_str() == "abc_1"));
    }

    #[test]
    fn a_literal_plus_stays_a_plus() {
        let id = identity(Some("email=a+b@x.com&type=AGENT"), V1).unwrap();
        let Identity::TeamMember { email, .. } = id else {
            panic!("not a team member")
        };
        assert_eq!(email.as_str(), "a+b@x.com");
    }

    #[test]
    fn every_rule_names_the_parameter() {
        assert!(detail("").contains("required"));
        assert!(detail("email=a@x.com").starts_with("type:"));
        assert!(detail("type=AGENT").starts_with("email:"));
        assert!(detail("email=a@x.com&type=ADMIN").contains("AGENT, CUSTOM_USER, CUSTOMER"));
        assert!(detail("email=a@x.com&email=b@x.com&type=AGENT").starts_with("email:"));
        assert!(detail("email=a@x.com&type=AGENT&type=AGENT").starts_with("type:"));
        assert!(
            detail("email=a@x.com&type=AGENT&foo=1")
                .starts_with("foo: is an unknown query parameter")
        );
        assert!(detail("userId=abc").starts_with("userId: is an unknown query parameter"));
        let odd = detail("email=a@x.com&type=AGENT&%3Cscript%3E=1");
        assert!(
            odd.starts_with("unknown query parameter;") && !odd.contains("script"),
            "{odd}"
        );
        let long = detail(&format!("{}=1", "x".repeat(33)));
        assert!(long.starts_with("unknown query parameter;"), "{long}");
        assert!(detail("email=a@x.com&type=AGENT&user_id=abc").contains("not both"));
        assert!(detail("email=%FF@x.com&type=AGENT").starts_with("email:"));
        assert!(detail("email=a%0A@x.com&type=AGENT").starts_with("email:"));
        assert!(detail("user_id=a%20b").starts_with("user_id:"));
        assert!(detail("email=nope&type=AGENT").starts_with("email:"));
    }
}
