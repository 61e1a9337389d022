//! How typed keys and values become bytes, at the edge of the typed handles.
//!
//! Strings and byte buffers (`String`, `&str`, `bytes::Bytes`, `serde_bytes` types: anything whose
//! `Serialize` calls `serialize_str` or `serialize_bytes` at the top) are stored as their raw bytes
//! with no framing, so `"user:1"` is the six bytes `user:1` on the wire, in the partition hash, and
//! to any other language. Everything else is encoded with postcard, a compact, stable serde format
//! (varint integers, length-prefixed sequences). Decoding is strict: a value must use every byte,
//! so a value read back as the wrong type fails with [`Error::Decode`] far more often than it
//! silently produces garbage.

use bytes::Bytes;
use serde::de::{DeserializeOwned, Visitor};
use serde::ser::{Impossible, Serialize};

use crate::error::{Error, Result};

/// Encodes a key or value.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    match value.serialize(RawProbe) {
        Ok(raw) => Ok(Bytes::from(raw)),
        Err(NotRaw) => postcard::to_stdvec(value)
            .map(Bytes::from)
            .map_err(|e| Error::Encode(e.to_string())),
    }
}

/// Decodes a value stored by [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    T::deserialize(RawOrPostcard(bytes)).map_err(|e| Error::Decode {
        type_name: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

/// A serializer that succeeds only for a top-level string or byte buffer.
struct RawProbe;

#[derive(Debug)]
struct NotRaw;

impl std::fmt::Display for NotRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a string or byte buffer")
    }
}
impl std::error::Error for NotRaw {}
impl serde::ser::Error for NotRaw {
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        NotRaw
    }
}

macro_rules! not_raw {
    ($($name:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $name(self, $(_: $arg),*) -> Result<Vec<u8>, NotRaw> { Err(NotRaw) })*
    };
}

impl serde::Serializer for RawProbe {
    type Ok = Vec<u8>;
    type Error = NotRaw;
    type SerializeSeq = Impossible<Vec<u8>, NotRaw>;
    type SerializeTuple = Impossible<Vec<u8>, NotRaw>;
    type SerializeTupleStruct = Impossible<Vec<u8>, NotRaw>;
    type SerializeTupleVariant = Impossible<Vec<u8>, NotRaw>;
    type SerializeMap = Impossible<Vec<u8>, NotRaw>;
    type SerializeStruct = Impossible<Vec<u8>, NotRaw>;
    type SerializeStructVariant = Impossible<Vec<u8>, NotRaw>;

    fn serialize_str(self, v: &str) -> Result<Vec<u8>, NotRaw> {
        Ok(v.as_bytes().to_vec())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Vec<u8>, NotRaw> {
        Ok(v.to_vec())
    }
    not_raw!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Vec<u8>, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<Vec<u8>, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Vec<u8>, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, NotRaw> {
        Err(NotRaw)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotRaw> {
        Err(NotRaw)
    }
}

/// A deserializer that reads a top-level string or byte buffer raw and everything else with
/// postcard, requiring every byte to be used.
struct RawOrPostcard<'a>(&'a [u8]);

macro_rules! via_postcard {
    ($($name:ident $(($($arg:ident: $ty:ty),*))?),* $(,)?) => {
        $(fn $name<V: Visitor<'de>>(self, $($($arg: $ty,)*)? visitor: V) -> Result<V::Value, postcard::Error> {
            let mut de = postcard::Deserializer::from_bytes(self.0);
            let value = serde::Deserializer::$name(&mut de, $($($arg,)*)? visitor)?;
            if de.finalize()?.is_empty() {
                Ok(value)
            } else {
                Err(postcard::Error::DeserializeBadEncoding)
            }
        })*
    };
}

impl<'de> serde::Deserializer<'de> for RawOrPostcard<'de> {
    type Error = postcard::Error;

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, postcard::Error> {
        let s = std::str::from_utf8(self.0).map_err(|_| postcard::Error::DeserializeBadUtf8)?;
        visitor.visit_borrowed_str(s)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, postcard::Error> {
        self.deserialize_str(visitor)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, postcard::Error> {
        visitor.visit_borrowed_bytes(self.0)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, postcard::Error> {
        visitor.visit_borrowed_bytes(self.0)
    }

    via_postcard!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_option,
        deserialize_unit,
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_seq,
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_map,
        deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
        deserialize_identifier,
        deserialize_ignored_any,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Session {
        user: u64,
        roles: Vec<String>,
    }

    #[test]
    fn strings_and_bytes_are_raw() {
        assert_eq!(&encode("user:1").unwrap()[..], b"user:1");
        assert_eq!(&encode(&"user:1".to_string()).unwrap()[..], b"user:1");
        assert_eq!(
            &encode(&Bytes::from_static(b"\x00\x01")).unwrap()[..],
            b"\x00\x01"
        );
        assert_eq!(decode::<String>(b"user:1").unwrap(), "user:1");
        assert_eq!(&decode::<Bytes>(b"\x00\x01").unwrap()[..], b"\x00\x01");
        assert_eq!(decode::<String>(b"").unwrap(), "");
    }

    #[test]
    fn other_types_round_trip_with_postcard() {
        let s = Session {
            user: 300,
            roles: vec!["admin".into()],
        };
        let bytes = encode(&s).unwrap();
        assert_eq!(decode::<Session>(&bytes).unwrap(), s);
        assert_eq!(&encode(&300u64).unwrap()[..], &[0xac, 0x02]);
        assert_eq!(
            decode::<u64>(&encode(&u64::MAX).unwrap()).unwrap(),
            u64::MAX
        );
        assert_eq!(
            decode::<Option<i32>>(&encode(&Some(-5)).unwrap()).unwrap(),
            Some(-5)
        );
    }

    #[test]
    fn wrong_types_are_decode_errors() {
        let bytes = encode(&Session {
            user: 1,
            roles: vec![],
        })
        .unwrap();
        assert!(matches!(decode::<u8>(&bytes), Err(Error::Decode { .. })));
        assert!(matches!(
            decode::<String>(&[0xff, 0xfe]),
            Err(Error::Decode { .. })
        ));
        assert!(matches!(
            decode::<u64>(b"not a number"),
            Err(Error::Decode { .. })
        ));
        assert!(matches!(decode::<Session>(b""), Err(Error::Decode { .. })));
    }
}
