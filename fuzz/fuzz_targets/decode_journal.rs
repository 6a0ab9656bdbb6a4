//! Replays arbitrary bytes as a consumer journal (`consumers.journal`): no input may
//! panic or allocate from an unchecked length, and a snapshot of the state it yields
//! must replay to the same state (`journal::fuzz_check` asserts how).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walq::__fuzz::decode_journal(data);
});
