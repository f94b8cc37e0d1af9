//! Framing: every message on a stream is one frame.
//!
//! ```text
//! byte 0      frame format version (FRAME_VERSION)
//! byte 1      codec: 0 = JSON, 1 = zstd-compressed JSON
//! bytes 2..6  body length, u32 big-endian, at most FRAME_BODY_MAX
//! bytes 6..   body
//! ```
//!
//! A decoded body is at most `DECODED_BODY_MAX` bytes, however well it compresses, so a
//! small frame cannot expand into a large allocation.

use serde::{Deserialize, Serialize};
use sync_core::{
    Access, DeviceId, Divergence, LibraryId, PullRequest, PullResponse, PushRequest, PushResponse,
    Seq,
};

/// The frame format this build writes and reads.
pub const FRAME_VERSION: u8 = 1;

/// The largest frame body accepted on the wire.
pub const FRAME_BODY_MAX: usize = 16 * 1024 * 1024;

/// The largest body after decompression.
pub const DECODED_BODY_MAX: usize = 64 * 1024 * 1024;

/// Bodies smaller than this are sent as they are: compressing them saves little.
const COMPRESS_FROM: usize = 1024;

/// zstd's level: the fastest, and on log batches as small as level 3's output
/// (BENCHMARKS.md, catch-up).
const ZSTD_LEVEL: i32 = 1;

const HEADER_LEN: usize = 6;
const CODEC_JSON: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// What a follower (or a joining device) sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Opens a session on a library; the first frame of a connection's control stream.
    Hello {
        /// The sender's sync protocol version.
        protocol_version: u32,
        /// The library.
        library_id: LibraryId,
    },
    /// Redeems an invite; the first frame of a joining device's control stream.
    Join {
        /// The sender's sync protocol version.
        protocol_version: u32,
        /// The library.
        library_id: LibraryId,
        /// The invite's one-time secret, hex.
        secret: String,
        /// The access the token states.
        access: Access,
        /// A name for the device, shown in the leader's device list.
        name: Option<String>,
    },
    /// Asks for a range of the log.
    Pull(PullRequest),
    /// Hands the leader outbox changes to sequence (write access only).
    Push(PushRequest),
}

/// What the leader answers.
///
/// Externally tagged (`{"pulled": {…}}`), unlike `Request`: an internally tagged enum is
/// parsed twice (serde buffers the whole message to find the tag first), and a pull's answer
/// is the bulk of the traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The session is open.
    Welcome {
        /// The leader's protocol version.
        protocol_version: u32,
        /// What this device may do.
        access: Access,
        /// The leader's latest seq.
        latest_seq: Seq,
    },
    /// The invite was redeemed: this device is a member now.
    Joined {
        /// The leader's protocol version.
        protocol_version: u32,
        /// The library's name.
        library_name: String,
        /// The leader's device id.
        leader_device_id: DeviceId,
        /// What this device may do.
        access: Access,
    },
    /// A pull's answer.
    Pulled(PullResponse),
    /// The answer to a push: what the leader took.
    Pushed(PushResponse),
    /// The leader's latest seq moved (sent on the control stream).
    Tip {
        /// The new latest seq.
        latest_seq: Seq,
    },
    /// The request was refused; the message tells the user what to do.
    Refused {
        /// What kind of refusal.
        code: Refusal,
        /// For the user.
        message: String,
        /// With `Refusal::HistoryDiverged`: how the histories differ, for the follower's
        /// typed error (`PullError::HistoryDiverged`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        divergence: Option<Divergence>,
        /// With `Refusal::Superseded` and `Refusal::StaleEpoch`: the newer epoch, for the
        /// follower's typed error (`PullError::Superseded`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<sync_core::Epoch>,
        /// With `Refusal::Moved`: the leader now, and where it listens.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        moved: Option<MovedTo>,
    },
}

/// Where leadership moved, as a `Refusal::Moved` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedTo {
    /// The leader now.
    pub leader: sync_core::DeviceId,
    /// Where it listens, as far as the device asked knows.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Why the leader refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The leader does not lead the library asked for.
    UnknownLibrary,
    /// The device is not a member of the library.
    NotMember,
    /// The device's membership was revoked.
    Revoked,
    /// The invite was refused.
    Invite,
    /// The request was malformed or out of order.
    BadRequest,
    /// The leader failed.
    Internal,
    /// The device may pull but not push (read access).
    ReadOnly,
    /// The leader's log is not the follower's history (a leader restored from an older
    /// copy): the pull is refused, the session stays.
    HistoryDiverged,
    /// A pushed change is of a model the leader's app does not know, or of another schema
    /// version: the push waits until the older app is updated.
    SchemaMismatch,
    /// The device asked no longer leads the library: a request stated a newer epoch than
    /// its own (`epoch` names it).
    Superseded,
    /// The device asked does not lead the library (it handed leadership on, or never
    /// led it): `moved` names the leader and its addresses, `epoch` its epoch.
    Moved,
}

impl Refusal {
    /// The QUIC application error code a connection is closed with after this refusal.
    pub fn close_code(self) -> u32 {
        match self {
            Refusal::VersionMismatch => 2,
            Refusal::UnknownLibrary => 3,
            Refusal::NotMember => 4,
            Refusal::Revoked => 5,
            Refusal::Invite => 6,
            Refusal::BadRequest => 7,
            Refusal::Internal => 8,
            Refusal::ReadOnly => 9,
            Refusal::HistoryDiverged => 10,
            Refusal::SchemaMismatch => 11,
            Refusal::Superseded => 12,
            Refusal::Moved => 13,
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than the header says.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// Another frame format.
    #[error(
        "the peer writes frame format {0}, this build reads {FRAME_VERSION}: update the older app"
    )]
    Version(u8),
    /// An unknown codec.
    #[error("unknown frame codec {0}")]
    Codec(u8),
    /// Too large.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not decompress.
    #[error("frame body does not decompress: {0}")]
    Compression(String),
    /// The body is not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes a message as one frame, compressed where that pays.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let (codec, body) = if json.len() >= COMPRESS_FROM {
        match zstd::bulk::compress(&json, ZSTD_LEVEL) {
            Ok(packed) if packed.len() < json.len() => (CODEC_ZSTD, packed),
            _ => (CODEC_JSON, json),
        }
    } else {
        (CODEC_JSON, json)
    };
    if body.len() > FRAME_BODY_MAX {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: FRAME_BODY_MAX,
        });
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.push(FRAME_VERSION);
    frame.push(codec);
    // Checked above: the length fits in u32.
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a header announces, checked against the limit.
pub fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    if header[0] != FRAME_VERSION {
        return Err(FrameError::Version(header[0]));
    }
    if header[1] != CODEC_JSON && header[1] != CODEC_ZSTD {
        return Err(FrameError::Codec(header[1]));
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len > FRAME_BODY_MAX {
        return Err(FrameError::TooLarge {
            len,
            max: FRAME_BODY_MAX,
        });
    }
    Ok(len)
}

/// Decodes one whole frame.
pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, FrameError> {
    let header: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated("header"))?;
    let len = body_len(header)?;
    let body = &frame[HEADER_LEN..];
    if body.len() != len {
        return Err(FrameError::Truncated("body"));
    }
    decode_body(header[1], body)
}

fn decode_body<T: for<'de> Deserialize<'de>>(codec: u8, body: &[u8]) -> Result<T, FrameError> {
    let unpacked;
    let json = if codec == CODEC_ZSTD {
        unpacked = zstd::bulk::decompress(body, DECODED_BODY_MAX)
            .map_err(|e| FrameError::Compression(e.to_string()))?;
        &unpacked[..]
    } else {
        body
    };
    serde_json::from_slice(json).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the stream ended")]
    Ended,
    #[error("{0}")]
    Stream(#[from] quinn::ReadError),
}

/// Reads one frame from a stream, undecoded; `Ended` if the stream finished before a
/// frame began.
pub(crate) async fn read_bytes(stream: &mut quinn::RecvStream) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(ReadError::Ended),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(FrameError::Truncated("header").into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = body_len(&header)?;
    let mut frame = vec![0u8; HEADER_LEN + len];
    frame[..HEADER_LEN].copy_from_slice(&header);
    match stream.read_exact(&mut frame[HEADER_LEN..]).await {
        Ok(()) => {
            metrics::counter!(sync_core::metrics::TRANSPORT_BYTES_RECEIVED)
                .increment(frame.len() as u64);
            Ok(frame)
        }
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(FrameError::Truncated("body").into()),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads and decodes one frame from a stream.
pub(crate) async fn read<T: for<'de> Deserialize<'de>>(
    stream: &mut quinn::RecvStream,
) -> Result<T, ReadError> {
    Ok(decode(&read_bytes(stream).await?)?)
}

/// Writes one frame to a stream.
pub(crate) async fn write<T: Serialize>(
    stream: &mut quinn::SendStream,
    message: &T,
) -> Result<(), crate::TransportError> {
    let frame = encode(message)?;
    stream
        .write_all(&frame)
        .await
        .map_err(|e| crate::TransportError::Lost(e.to_string()))?;
    metrics::counter!(sync_core::metrics::TRANSPORT_BYTES_SENT).increment(frame.len() as u64);
    Ok(())
}

/// The protocol version a peer's first frame states, if it states one: lets a leader
/// name the version of a peer whose messages it cannot read.
pub fn stated_protocol_version(frame: &[u8]) -> Option<u64> {
    let value: serde_json::Value = decode(frame).ok()?;
    value.get("protocol_version")?.as_u64()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Request {
        Request::Hello {
            protocol_version: 1,
            library_id: LibraryId::new_random(),
        }
    }

    #[test]
    fn a_frame_round_trips_compressed_or_not() {
        let small = hello();
        assert_eq!(decode::<Request>(&encode(&small).unwrap()).unwrap(), small);
        let big = Response::Refused {
            code: Refusal::Internal,
            message: "x".repeat(10_000),
            divergence: None,
            epoch: None,
            moved: None,
        };
        let frame = encode(&big).unwrap();
        assert_eq!(frame[1], CODEC_ZSTD);
        assert!(frame.len() < 1_000);
        assert_eq!(decode::<Response>(&frame).unwrap(), big);
    }

    #[test]
    fn a_divergence_crosses_typed_and_other_refusals_keep_their_bytes() {
        let divergence = Divergence {
            position: Seq(5),
            checksum: 7,
            leader_latest_seq: Seq(3),
            leader_checksum: None,
        };
        let refused = Response::Refused {
            code: Refusal::HistoryDiverged,
            message: divergence.to_string(),
            divergence: Some(divergence),
            epoch: None,
            moved: None,
        };
        assert_eq!(
            decode::<Response>(&encode(&refused).unwrap()).unwrap(),
            refused
        );
        // Without a divergence the field is left out: the bytes other refusals had.
        let plain = Response::Refused {
            code: Refusal::Internal,
            message: "x".into(),
            divergence: None,
            epoch: None,
            moved: None,
        };
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"refused":{"code":"internal","message":"x"}}"#
        );
        // A pull that states no checksum (as before the field) is from checksum 0.
        let library_id = LibraryId::new_random();
        let pull = serde_json::json!({"type": "pull", "protocol_version": 1,
            "library_id": library_id, "after": 0, "limit": 10, "max_bytes": 100,
            "models": null});
        let Request::Pull(pull) = decode::<Request>(&encode(&pull).unwrap()).unwrap() else {
            panic!("a pull");
        };
        assert_eq!(
            (pull.after, pull.after_checksum, pull.limit),
            (Seq::ZERO, 0, 10)
        );
    }

    #[test]
    fn bad_frames_are_refused_with_their_reason() {
        let mut frame = encode(&hello()).unwrap();
        frame[0] = 9;
        assert_eq!(decode::<Request>(&frame), Err(FrameError::Version(9)));
        let mut frame = encode(&hello()).unwrap();
        frame[1] = 7;
        assert_eq!(decode::<Request>(&frame), Err(FrameError::Codec(7)));
        let mut frame = encode(&hello()).unwrap();
        frame[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode::<Request>(&frame),
            Err(FrameError::TooLarge { .. })
        ));
        let frame = encode(&hello()).unwrap();
        assert_eq!(
            decode::<Request>(&frame[..frame.len() - 1]),
            Err(FrameError::Truncated("body"))
        );
        assert_eq!(
            decode::<Request>(&[1, 0]),
            Err(FrameError::Truncated("header"))
        );
    }

    #[test]
    fn a_compression_bomb_is_refused() {
        let zeros = vec![b' '; DECODED_BODY_MAX + 1];
        let packed = zstd::bulk::compress(&zeros, 19).unwrap();
        let mut frame = vec![FRAME_VERSION, CODEC_ZSTD];
        frame.extend_from_slice(&(packed.len() as u32).to_be_bytes());
        frame.extend_from_slice(&packed);
        assert!(matches!(
            decode::<Request>(&frame),
            Err(FrameError::Compression(_))
        ));
    }

    #[test]
    fn a_newer_peer_s_version_is_read_from_its_first_frame() {
        let future = serde_json::json!({"type": "hello_v9", "protocol_version": 9});
        assert_eq!(stated_protocol_version(&encode(&future).unwrap()), Some(9));
        assert!(decode::<Request>(&encode(&future).unwrap()).is_err());
    }

    proptest! {
        /// The decoder returns an error, never panics, on arbitrary bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        /// Flipping any byte of a valid frame gives an error or a message, never a panic.
        #[test]
        fn corrupted_frames_never_panic(at in 0usize..64, to in any::<u8>()) {
            let mut frame = encode(&hello()).unwrap();
            let at = at % frame.len();
            frame[at] = to;
            let _ = decode::<Request>(&frame);
        }
    }
}
