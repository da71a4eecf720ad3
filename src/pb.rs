//! Generated protobuf and gRPC code, and the encoded descriptor set that reflection serves.
//! Nothing else lives here: conversions between these types and the domain live in each
//! service's `grpc.rs`.
#![allow(clippy::all, missing_docs)]

/// `roster.v1`: messages, enums, clients and servers.
pub mod v1 {
    tonic::include_proto!("roster.v1");
}

/// The encoded `FileDescriptorSet` of every proto file (incl. imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("roster_descriptor");

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost::Message as _;
    use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

    /// Every element of `roster.v1` (`Service.Method`, `Message`, `Message.field`, `Enum`,
    /// `Enum.VALUE`) with its number, or "rpc" / "message" / "enum".
    fn elements(encoded: &[u8]) -> BTreeMap<String, String> {
        fn message(out: &mut BTreeMap<String, String>, prefix: &str, m: &DescriptorProto) {
            let name = format!("{prefix}{}", m.name());
            out.insert(name.clone(), "message".into());
            for f in &m.field {
                out.insert(format!("{name}.{}", f.name()), f.number().to_string());
            }
            for e in &m.enum_type {
                enumeration(out, &format!("{name}."), e);
            }
            for n in &m.nested_type {
                message(out, &format!("{name}."), n);
            }
        }
        fn enumeration(out: &mut BTreeMap<String, String>, prefix: &str, e: &EnumDescriptorProto) {
            let name = format!("{prefix}{}", e.name());
            out.insert(name.clone(), "enum".into());
            for v in &e.value {
                out.insert(format!("{name}.{}", v.name()), v.number().to_string());
            }
        }
        // A buf image is a FileDescriptorSet on the wire (its extra fields are skipped).
        let set = FileDescriptorSet::decode(encoded).unwrap();
        let mut out = BTreeMap::new();
        for file in set.file.iter().filter(|f| f.package() == "roster.v1") {
            for s in &file.service {
                for m in &s.method {
                    out.insert(format!("{}.{}", s.name(), m.name()), "rpc".into());
                }
            }
            for m in &file.message_type {
                message(&mut out, "", m);
            }
            for e in &file.enum_type {
                enumeration(&mut out, "", e);
            }
        }
        out
    }

    /// docs/api-additions.md's table lists exactly what the protocol has beyond the released
    /// v1 API, with the right numbers: a client writer reading it misses nothing and meets
    /// no name the server does not have.
    #[test]
    fn api_additions_are_documented() {
        let now = elements(super::FILE_DESCRIPTOR_SET);
        let released = elements(include_bytes!("../proto/baseline.binpb"));
        assert!(released.len() > 400, "the baseline image decodes");
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/api-additions.md"
        ))
        .unwrap();
        let mut listed = BTreeMap::new();
        for line in doc.lines() {
            let Some(rest) = line.strip_prefix("| `") else {
                continue;
            };
            let (name, rest) = rest.split_once("` | ").unwrap();
            let number = rest.split(" |").next().unwrap().trim();
            assert!(
                listed
                    .insert(name.to_string(), number.to_string())
                    .is_none(),
                "{name} listed twice"
            );
        }
        let added: BTreeMap<String, String> = now
            .into_iter()
            .filter(|(name, _)| !released.contains_key(name))
            .collect();
        let missing: Vec<_> = added
            .iter()
            .filter(|(k, v)| listed.get(*k) != Some(v))
            .collect();
        let wrong: Vec<_> = listed
            .iter()
            .filter(|(k, v)| added.get(*k) != Some(v))
            .collect();
        assert!(
            missing.is_empty() && wrong.is_empty(),
            "docs/api-additions.md: not listed as in the protocol {missing:?}; listed but not \
             so in the protocol {wrong:?}"
        );
    }
}
