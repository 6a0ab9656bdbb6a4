//! Decodes arbitrary bytes as a batch: peek, verify, validate, and iterate the records and
//! their headers. No input may panic, overflow or allocate from an unchecked length, and the
//! decoders must agree with each other (`batch::fuzz_decode` asserts how).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walq::__fuzz::decode_batch(data);
});
