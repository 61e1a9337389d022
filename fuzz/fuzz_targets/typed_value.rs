//! Fuzz target: `peergrid::fuzzing::typed_value` must not panic on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    peergrid::fuzzing::typed_value(data);
});
