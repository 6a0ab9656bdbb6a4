//! The API's JSON types: bytes as `walq dump --format json` writes them (a
//! string when the bytes are UTF-8, else `{"hex": "..."}`), records, and
//! every response body. Each derives `ToSchema`, so the OpenAPI document
//! (`GET /openapi.json`) is generated from the very types the handlers
//! serialize. The configuration's option types, which live in `config.rs`,
//! get their schemas here from mirror structs that a test keeps in step.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::config::{DurabilitySpec, GroupOptions, QueueOptions, StartSpec};

/// Bytes in JSON: a string when they are UTF-8 (the string's UTF-8 bytes),
/// else `{"hex": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = Bytes)]
pub(crate) enum InBytes {
    /// Bytes that are UTF-8, as text.
    Text(String),
    /// Any bytes, as hex.
    Hex {
        /// Two hex digits per byte.
        #[schema(pattern = "^([0-9a-fA-F]{2})*$")]
        hex: String,
    },
}

impl InBytes {
    /// The JSON form of `b`: text when UTF-8, else hex.
    pub(crate) fn of(b: &[u8]) -> InBytes {
        match std::str::from_utf8(b) {
            Ok(s) => InBytes::Text(s.to_string()),
            Err(_) => {
                let mut hex = String::with_capacity(b.len() * 2);
                for byte in b {
                    hex.push_str(&format!("{byte:02x}"));
                }
                InBytes::Hex { hex }
            }
        }
    }

    pub(crate) fn into_bytes(self) -> Result<Vec<u8>, String> {
        match self {
            InBytes::Text(s) => Ok(s.into_bytes()),
            InBytes::Hex { hex } => {
                if hex.len() % 2 != 0 {
                    return Err("hex has an odd number of digits".into());
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|d| u8::from_str_radix(d, 16).ok())
                            .ok_or_else(|| format!("{hex:?} is not hex"))
                    })
                    .collect()
            }
        }
    }
}

/// Record headers, `(name, value)` in order.
pub(crate) type HeaderPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Record headers as a client sends them: `[[name, value], ...]` (order and
/// repeats kept) or `{"name": value, ...}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = RecordHeadersIn)]
pub(crate) enum InHeaders {
    /// `[[name, value], ...]`: order and repeats kept.
    Pairs(Vec<(InBytes, InBytes)>),
    /// `{"name": value, ...}`.
    Map(HeaderObject),
}

/// Record headers as an object, `{"name": value, ...}`; each value is
/// checked when the entry is (a bad one refuses that entry only).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub(crate) struct HeaderObject(serde_json::Map<String, Value>);

impl PartialSchema for HeaderObject {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Object))
            .additional_properties(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(InBytes::name()))))
            .description(Some("`{\"name\": value, ...}`: record headers by name (values as bytes)"))
            .into()
    }
}

impl ToSchema for HeaderObject {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((InBytes::name().into_owned(), InBytes::schema()));
    }
}

impl InHeaders {
    pub(crate) fn into_pairs(self) -> Result<HeaderPairs, String> {
        match self {
            InHeaders::Pairs(p) => {
                p.into_iter().map(|(n, v)| Ok((n.into_bytes()?, v.into_bytes()?))).collect()
            }
            InHeaders::Map(HeaderObject(m)) => m
                .into_iter()
                .map(|(n, v)| {
                    let v: InBytes = serde_json::from_value(v).map_err(|e| format!("header {n:?}: {e}"))?;
                    Ok((n.into_bytes(), v.into_bytes()?))
                })
                .collect(),
        }
    }
}

/// A record read from the log.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Record)]
pub(crate) struct RecordOut {
    /// The record's offset.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The key, or null for none.
    #[schema(required = true)]
    pub key: Option<InBytes>,
    /// The headers, `[name, value]` pairs in order (repeats kept).
    pub headers: Vec<(InBytes, InBytes)>,
    /// The value.
    pub value: InBytes,
}

impl RecordOut {
    pub(crate) fn of(r: &walq::OwnedRecord) -> RecordOut {
        RecordOut {
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.as_deref().map(InBytes::of),
            headers: r.headers.iter().map(|(n, v)| (InBytes::of(n), InBytes::of(v))).collect(),
            value: InBytes::of(&r.value),
        }
    }
}

/// One delivery of a consumer group: a record, its delivery id and count.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Delivery)]
pub(crate) struct DeliveryOut {
    /// The record.
    #[serde(flatten)]
    pub record: RecordOut,
    /// The delivery id: pass it back to settle this delivery.
    #[schema(pattern = "^[0-9]+\\.[0-9]+\\.[0-9]+$")]
    pub id: String,
    /// How many times the record was delivered, this time included.
    pub delivery_count: u32,
}

/// A produced record's place.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Produced {
    /// The record's offset.
    pub offset: u64,
    /// Its timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// How durable it was when this answer was sent.
    pub durability: DurabilitySpec,
}

/// One entry's result in a batch: its place, or why it was refused.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum BatchResult {
    /// Appended.
    Appended {
        /// The record's offset.
        offset: u64,
        /// Its timestamp, milliseconds since the Unix epoch.
        timestamp_ms: u64,
    },
    /// Refused (the other entries were appended all the same).
    Refused {
        /// Why.
        error: EntryError,
    },
}

/// Why a batch entry was refused.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EntryError {
    /// `bad_request` or `record_too_large`.
    #[schema(value_type = crate::error::ErrorCode)]
    pub code: &'static str,
    /// For people.
    pub message: String,
}

/// A batch's answer: one result per entry, in order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchProduced {
    /// One per entry, in order.
    pub results: Vec<BatchResult>,
    /// How many entries were appended.
    pub appended: u64,
    /// How durable the appended ones were when this answer was sent.
    pub durability: DurabilitySpec,
}

/// Records read from a queue or dead-letter queue.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Records {
    /// The records, in offset order.
    pub records: Vec<RecordOut>,
    /// The offset to read next.
    pub next_offset: u64,
}

/// Records read by a named consumer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConsumerRecords {
    /// The records, in offset order.
    pub records: Vec<RecordOut>,
    /// The offset to read next (commit it once they are processed).
    pub next_offset: u64,
    /// The consumer's committed position.
    pub committed: u64,
}

/// A named consumer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Consumer {
    /// Its name.
    pub name: String,
    /// The committed position: the offset it reads next.
    pub committed: u64,
    /// Records between the committed position and the end of the log.
    pub lag: u64,
}

impl Consumer {
    pub(crate) fn of(c: &walq::ConsumerInfo) -> Consumer {
        Consumer { name: c.name.clone(), committed: c.position, lag: c.lag }
    }
}

/// A named consumer, and whether this request created it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConsumerCreated {
    /// The consumer.
    #[serde(flatten)]
    pub consumer: Consumer,
    /// Whether this request created it.
    pub created: bool,
}

/// A queue's named consumers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Consumers {
    /// By name.
    pub consumers: Vec<Consumer>,
}

/// A consumer group's counters since its queue was opened.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupStats {
    /// Deliveries handed out.
    pub delivered: u64,
    /// Of which redeliveries.
    pub redelivered: u64,
    /// Acks.
    pub acked: u64,
    /// Nacks.
    pub nacked: u64,
    /// Ack waits that ran out.
    pub expired: u64,
    /// Records sent to the dead letters.
    pub dead_lettered: u64,
    /// Records skipped (removed by retention before they were delivered).
    pub skipped: u64,
}

/// A consumer group's state.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Group {
    /// Its name.
    pub name: String,
    /// Every record below this offset is settled.
    pub ack_floor: u64,
    /// Records not delivered yet.
    pub pending: u64,
    /// Records waiting for a redelivery.
    pub waiting_redelivery: u64,
    /// Deliveries in flight.
    pub unacked: u64,
    /// Counters.
    pub stats: GroupStats,
    /// The group's options (present once the server opened the group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<GroupOptions>,
    /// Records in its dead letters, null if it has none (present once the
    /// server opened the group).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub dead_letters: Option<Option<u64>>,
}

impl Group {
    /// `open`: the group's handle here, if open (then its dead letters are
    /// counted); `saved`: its saved options (the defaults when none were).
    pub(crate) fn of(
        info: &walq::GroupInfo,
        open: Option<&(walq::Group, GroupOptions)>,
        saved: Option<&GroupOptions>,
    ) -> Group {
        let s = info.stats;
        Group {
            name: info.name.clone(),
            ack_floor: info.ack_floor,
            pending: info.pending,
            waiting_redelivery: info.waiting_redelivery,
            unacked: info.unacked,
            stats: GroupStats {
                delivered: s.delivered,
                redelivered: s.redelivered,
                acked: s.acked,
                nacked: s.nacked,
                expired: s.expired,
                dead_lettered: s.dead_lettered,
                skipped: s.skipped,
            },
            options: Some(open.map(|(_, o)| o.clone()).or_else(|| saved.cloned()).unwrap_or_default()),
            dead_letters: open.map(|(g, _)| g.dead_letters().map(|d| d.next_offset() - d.first_offset())),
        }
    }
}

/// A consumer group, and whether this request created it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupCreated {
    /// The group.
    #[serde(flatten)]
    pub group: Group,
    /// Whether this request created it.
    pub created: bool,
}

/// A queue's consumer groups.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Groups {
    /// By name.
    pub groups: Vec<Group>,
}

/// Deliveries handed out by one fetch.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Deliveries {
    /// In offset order; empty if none came within the wait.
    pub deliveries: Vec<DeliveryOut>,
}

/// What a settle did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Settled {
    /// The delivery id, as sent.
    pub id: String,
    /// The action done.
    pub done: SettleAction,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SettleAction {
    /// Done: never delivered again.
    Ack,
    /// Redeliver (after `delay_ms`).
    Nack,
    /// Restart the ack wait.
    InProgress,
    /// Straight to the dead letters.
    Term,
}

/// A queue: its offsets, counters and options.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueueSummary {
    /// Its name.
    pub name: String,
    /// The first offset held.
    pub first_offset: u64,
    /// The offset the next record gets.
    pub next_offset: u64,
    /// Offset after the last record an fdatasync covered.
    pub durable_offset: u64,
    /// Offset after the last record readers can see.
    pub visible_offset: u64,
    /// Segment files.
    pub segments: u64,
    /// Records appended since the server opened it.
    pub appends: u64,
    /// Value bytes appended since the server opened it.
    pub bytes: u64,
    /// fdatasyncs of its segments.
    pub flushes: u64,
    /// Records per fdatasync, on average (group commit at work).
    pub records_per_flush_mean: f64,
    /// Whether a failed write or sync poisoned it (appends then fail until a restart).
    pub poisoned: bool,
    /// Its options.
    pub options: QueueOptions,
}

/// A queue with its consumers and groups.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueueDetail {
    /// The queue.
    #[serde(flatten)]
    pub queue: QueueSummary,
    /// Its named consumers.
    pub consumers: Vec<Consumer>,
    /// Its consumer groups.
    pub groups: Vec<Group>,
}

/// A queue, and whether this request created it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueueCreated {
    /// The queue.
    #[serde(flatten)]
    pub queue: QueueSummary,
    /// Whether this request created it (its options are those of its creation).
    pub created: bool,
}

/// Every queue, by name.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Queues {
    /// By name.
    pub queues: Vec<QueueSummary>,
}

/// The answer to `POST /v1/shutdown`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Draining {
    /// Always `draining`.
    #[schema(value_type = String, pattern = "^draining$")]
    pub status: &'static str,
}

// ---- schemas of the configuration's types (config.rs) ----

fn string_schema(description: &str, pattern: &str, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .description(Some(description))
        .pattern(Some(pattern))
        .examples([Value::String(example.to_string())])
        .into()
}

/// `sync`, `os`, `interval` or `interval:MS` with MS from 1 to 3600000 (the
/// server also accepts any case, an `ms` suffix and surrounding blanks).
pub(crate) const DURABILITY_PATTERN: &str =
    "^(sync|os|interval(:([1-9][0-9]{0,5}|[12][0-9]{6}|3[0-5][0-9]{5}|3600000)(ms)?)?)$";

/// `earliest`, `latest`, `offset:N` or `timestamp:MS`.
pub(crate) const START_PATTERN: &str = "^(earliest|latest|offset:[0-9]{1,19}|timestamp:[0-9]{1,19})$";

impl PartialSchema for DurabilitySpec {
    fn schema() -> RefOr<Schema> {
        string_schema(
            "A durability mode: `sync` (answered after an fdatasync covered the record), `os` (once \
             written to the OS), `interval` (synced within 100 ms) or `interval:MS` (within MS \
             milliseconds, 1 to 3600000).",
            DURABILITY_PATTERN,
            "sync",
        )
    }
}

impl ToSchema for DurabilitySpec {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Durability")
    }
}

impl PartialSchema for StartSpec {
    fn schema() -> RefOr<Schema> {
        string_schema(
            "Where a new consumer or group starts: `earliest`, `latest`, `offset:N` or \
             `timestamp:MS` (the first record at or after that time).",
            START_PATTERN,
            "earliest",
        )
    }
}

impl ToSchema for StartSpec {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Start")
    }
}

// The schema of `QueueOptions` (which config.rs defines); its doc comment
// is the schema's description.
/// A queue's options, given when it is created and saved beside it (a
/// restart opens it the same way). Unset ones take the server's
/// `queue_defaults`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Read by serde in the test that keeps it in step.
pub(crate) struct QueueOptionsSchema {
    /// The queue's durability mode: what a produce without `Walq-Durability`
    /// gets (default `sync`). Not null.
    #[serde(default)]
    durability: DurabilitySpec,
    /// Segment size in bytes (64 MiB if unset), 4 KiB to 2 GiB.
    #[schema(minimum = 4096, maximum = 2147483648_u64)]
    segment_bytes: Option<u64>,
    /// Largest encoded record in bytes (1 MiB if unset), at most 32 MiB.
    #[schema(minimum = 1, maximum = 33554432)]
    max_record_bytes: Option<u64>,
    /// Retention: remove the oldest segments above this many bytes (at
    /// least `segment_bytes`).
    #[schema(minimum = 4096)]
    retention_max_bytes: Option<u64>,
    /// Retention: remove segments whose newest record is older than this.
    retention_max_age_ms: Option<u64>,
    /// Retention in queue mode: remove what every consumer and group has
    /// finished (default false). Not null.
    #[serde(default)]
    queue_mode: bool,
    /// Backpressure: produces beyond this many bytes get 429 `queue_full`
    /// (at least twice `segment_bytes`).
    #[schema(minimum = 8192)]
    max_bytes: Option<u64>,
}

impl PartialSchema for QueueOptions {
    fn schema() -> RefOr<Schema> {
        QueueOptionsSchema::schema()
    }
}

impl ToSchema for QueueOptions {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("QueueOptions")
    }
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        QueueOptionsSchema::schemas(schemas);
    }
}

// The schema of `GroupOptions` (which config.rs defines).
/// A consumer group's options, saved beside the queue (a restart opens the
/// group the same way). Unset ones take walq's defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Read by serde in the test that keeps it in step.
pub(crate) struct GroupOptionsSchema {
    /// Where a new group starts (default `earliest`).
    start: Option<StartSpec>,
    /// Redelivery deadline of a delivery, in milliseconds (default 30000).
    #[schema(minimum = 1)]
    ack_wait_ms: Option<u64>,
    /// Deliveries before the dead letters (default 5; 0 for no limit).
    max_deliver: Option<u32>,
    /// Most deliveries one fetch hands out (default 256).
    #[schema(minimum = 1)]
    prefetch: Option<u64>,
    /// Durability of acks (default `interval:100`).
    ack_durability: Option<DurabilitySpec>,
    /// Whether given-up records go to the dead letters (default true).
    dead_letters: Option<bool>,
}

impl PartialSchema for GroupOptions {
    fn schema() -> RefOr<Schema> {
        GroupOptionsSchema::schema()
    }
}

impl ToSchema for GroupOptions {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("GroupOptions")
    }
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        GroupOptionsSchema::schemas(schemas);
    }
}

/// The property names of an object schema.
#[cfg(test)]
fn property_names(s: RefOr<Schema>) -> Vec<String> {
    match s {
        RefOr::T(Schema::Object(o)) => o.properties.keys().cloned().collect(),
        _ => panic!("not an object schema"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bytes_round_trip_as_text_or_hex() {
        for b in [&b"plain"[..], &[0xff, 0x00, 0x10][..], b""] {
            let v = serde_json::to_value(InBytes::of(b)).unwrap();
            let back: InBytes = serde_json::from_value(v).unwrap();
            assert_eq!(back.into_bytes().unwrap(), b);
        }
        assert_eq!(serde_json::to_value(InBytes::of(&[0xff, 0])).unwrap(), json!({"hex": "ff00"}));
        let odd: InBytes = serde_json::from_value(json!({"hex": "abc"})).unwrap();
        assert!(odd.into_bytes().is_err());
        let bad: InBytes = serde_json::from_value(json!({"hex": "zz"})).unwrap();
        assert!(bad.into_bytes().is_err());
        // Multi-byte characters must not split a hex slice mid-character.
        let wide: InBytes = serde_json::from_value(json!({"hex": "éé"})).unwrap();
        assert!(wide.into_bytes().is_err());
    }

    #[test]
    fn headers_as_pairs_or_map() {
        let p: InHeaders = serde_json::from_value(json!([["a", "1"], ["a", {"hex": "02"}]])).unwrap();
        assert_eq!(p.into_pairs().unwrap(), vec![(b"a".to_vec(), b"1".to_vec()), (b"a".to_vec(), vec![2])]);
        let m: InHeaders = serde_json::from_value(json!({"reply_to": "r"})).unwrap();
        assert_eq!(m.into_pairs().unwrap(), vec![(b"reply_to".to_vec(), b"r".to_vec())]);
    }

    /// The option schemas mirror the real types: the same field names, and
    /// whatever the real type writes the mirror reads (and the reverse); a
    /// field the schema lets be null or absent, the real type takes so.
    #[test]
    fn option_schemas_mirror_the_config_types() {
        let queue = QueueOptions {
            durability: "os".parse().unwrap(),
            segment_bytes: Some(1),
            max_record_bytes: Some(2),
            retention_max_bytes: Some(3),
            retention_max_age_ms: Some(4),
            queue_mode: true,
            max_bytes: Some(5),
        };
        let group = GroupOptions {
            start: Some("latest".parse().unwrap()),
            ack_wait_ms: Some(1),
            max_deliver: Some(2),
            prefetch: Some(3),
            ack_durability: Some("sync".parse().unwrap()),
            dead_letters: Some(false),
        };
        for (written, mut schema_names) in [
            (serde_json::to_value(&queue).unwrap(), property_names(QueueOptions::schema())),
            (serde_json::to_value(&group).unwrap(), property_names(GroupOptions::schema())),
        ] {
            let mut names: Vec<String> = written.as_object().unwrap().keys().cloned().collect();
            names.sort();
            schema_names.sort();
            assert_eq!(names, schema_names, "the schema mirror lags the config type");
        }
        let _: QueueOptionsSchema = serde_json::from_value(serde_json::to_value(&queue).unwrap()).unwrap();
        let _: GroupOptionsSchema = serde_json::from_value(serde_json::to_value(&group).unwrap()).unwrap();
        let _: QueueOptionsSchema =
            serde_json::from_value(serde_json::to_value(QueueOptions::default()).unwrap()).unwrap();
        let nullable = |s: RefOr<Schema>| -> Vec<(String, bool)> {
            let RefOr::T(Schema::Object(o)) = s else { panic!("not an object schema") };
            let v = serde_json::to_value(&o).unwrap();
            let mut out = Vec::new();
            for (name, p) in v["properties"].as_object().unwrap() {
                let null = p["type"].as_array().is_some_and(|t| t.contains(&json!("null")))
                    || p["oneOf"].as_array().is_some_and(|o| o.contains(&json!({"type": "null"})));
                let required = v["required"].as_array().is_some_and(|r| r.contains(&json!(name)));
                assert!(!required, "{name}: every option is optional");
                out.push((name.clone(), null));
            }
            out
        };
        for (name, null) in nullable(QueueOptions::schema()) {
            let with_null: Result<QueueOptions, _> = serde_json::from_value(json!({ name.clone(): null }));
            assert_eq!(with_null.is_ok(), null, "QueueOptions.{name}: null allowed by the schema: {null}");
            let _: QueueOptions = serde_json::from_value(json!({})).unwrap();
        }
        for (name, null) in nullable(GroupOptions::schema()) {
            let with_null: Result<GroupOptions, _> = serde_json::from_value(json!({ name.clone(): null }));
            assert_eq!(with_null.is_ok(), null, "GroupOptions.{name}: null allowed by the schema: {null}");
        }
    }
}
