//! AIP-160 filters: parsing, then compiling against the user and event field whitelists,
//! must never panic or overflow the stack, whatever the text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use roster::query::sql::{Sql, compile};

fuzz_target!(|data: &str| {
    if let Ok(Some(expr)) = roster::query::filter::parse(data) {
        let _ = compile(&expr, roster::users::store::filter_field, &mut Sql::new());
        let _ = compile(&expr, roster::events::store::filter_field, &mut Sql::new());
    }
});
