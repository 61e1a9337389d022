//! Fuzz target: `peergrid::fuzzing::datagram` must not panic on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    peergrid::fuzzing::datagram(data);
});
