//! Fuzz target: `peergrid::fuzzing::rpc_message` must not panic on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    peergrid::fuzzing::rpc_message(data);
});
