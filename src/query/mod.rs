//! Listing machinery shared by every List RPC: the AIP-160 filter parser ([`filter`]), its
//! compilation to parameterised SQL over a field whitelist ([`sql`]), and `order_by`, keyset
//! cursors and page tokens ([`page`]).
pub mod filter;
pub mod page;
pub mod sql;
