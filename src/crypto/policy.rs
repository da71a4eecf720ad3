//! What a new password must be (NIST SP 800-63B): 8 (or a configured minimum) to 1,024
//! characters, not one of the most common passwords, and not the user's own email, username
//! or phone number. No composition rules: they make passwords harder to remember, not to
//! guess.
use std::collections::HashSet;
use std::sync::LazyLock;

/// Fewest characters in a password.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Most characters in a password.
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// The bundled list (see the file's header for its source), lower case.
static COMMON: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("common-passwords.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// Checks only the length: for a password being verified rather than set.
pub fn check_length(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
    }
    Ok(())
}

/// Checks a new password of at least `min_chars` characters (a project may ask for more than
/// [`MIN_PASSWORD_CHARS`]). `personal` holds the user's own email, username and phone number
/// (whichever it has); the password may not be any of them, nor the email's local part.
pub fn check_new_password(
    password: &str,
    personal: &[&str],
    min_chars: usize,
) -> Result<(), String> {
    match problems(password, personal, min_chars).into_iter().next() {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// Every rule of [`check_new_password`] that `password` breaks, in that order.
pub fn problems(password: &str, personal: &[&str], min_chars: usize) -> Vec<String> {
    let mut found = Vec::new();
    let n = password.chars().count();
    let min = min_chars.max(MIN_PASSWORD_CHARS);
    if n < min {
        found.push(format!("must be at least {min} characters"));
    }
    if n > MAX_PASSWORD_CHARS {
        found.push(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        // Nothing longer is worth lower-casing and comparing.
        return found;
    }
    let lower = password.to_lowercase();
    if COMMON.contains(lower.as_str()) {
        found.push("is one of the most common passwords; choose a less guessable one".into());
    }
    let own = personal.iter().any(|p| {
        let p = p.trim().to_lowercase();
        let local = p.split_once('@').map(|(l, _)| l.to_string());
        !p.is_empty() && (lower == p || local.is_some_and(|l| lower == l))
    });
    if own {
        found.push("must not be the user's own email address, username or phone number".into());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_is_counted_in_characters() {
        assert!(check_length("short").is_err());
        assert!(check_length("long enough").is_ok());
        assert!(check_length(&"é".repeat(1024)).is_ok());
        assert!(check_length(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn common_and_personal_passwords_are_refused() {
        assert_eq!(COMMON.len(), 10_000);
        for common in ["password", "PassWord", "12345678", "iloveyou", "felicidade"] {
            let e = check_new_password(common, &[], 8).unwrap_err();
            assert!(e.contains("common"), "{common}: {e}");
        }
        let me = ["ada.lovelace@example.com", "countess_ada", "+14155550123"];
        for own in [
            "Ada.Lovelace@example.com",
            "ada.lovelace",
            "COUNTESS_ADA",
            "+14155550123",
        ] {
            let e = check_new_password(own, &me, 8).unwrap_err();
            assert!(e.contains("own"), "{own}: {e}");
        }
        assert!(check_new_password("correct horse battery staple", &me, 8).is_ok());
        let e = check_new_password("horse battery", &me, 15).unwrap_err();
        assert_eq!(e, "must be at least 15 characters");
        assert!(check_new_password("horse battery staple", &me, 15).is_ok());
        // Every broken rule, in order.
        assert_eq!(
            problems("password", &["password@example.com"], 12),
            [
                "must be at least 12 characters",
                "is one of the most common passwords; choose a less guessable one",
                "must not be the user's own email address, username or phone number",
            ]
        );
        assert_eq!(problems(&"x".repeat(1025), &[], 8).len(), 1);
    }
}
