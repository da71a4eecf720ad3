//! Page tokens come back from clients: decoding any text must answer Ok or Err, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use roster::query::page::{decode_token, parse_order};
use roster::users::store::ORDER_FIELDS;

fuzz_target!(|data: &str| {
    for order_by in ["", "email desc", "last_login_at, display_name desc"] {
        if let Ok(order) = parse_order(order_by, ORDER_FIELDS, "created_at") {
            let _ = decode_token(data, "fingerprint", &order);
        }
    }
});
