"""The values CI writes in the fields routes match on, as its documentation lists them
(see "The Event" in docs/concepts.md); what routes are checked against."""

from __future__ import annotations

KINDS = ("job", "workflow", "moderation")
# JobsDetail.State and WorkflowExecution.State ("Submitted、Running、Success、Failed、Pause、
# Cancel"); a moderation event's state is Success or Failed.
STATES = ("Submitted", "Running", "Success", "Failed", "Pause", "Cancel")
# Event.moderation.result -> the verdict a route names.
VERDICTS = {0: "normal", 1: "violation", 2: "suspected"}
EVENT_NAMES = (
    "TaskFinish",
    "WorkflowFinish",
    "WorkflowStart",
    "ReviewImage",
    "ReviewVideo",
    "ReviewAudio",
    "ReviewText",
    "ReviewDocument",
    "ReviewHtml",
    "ReviewLive",
)
# Every job Tag CI's documentation and SDKs name; CI adds job types now and then, so a
# tag outside this list is a warning, not an error.
TAGS = (
    "Transcode",
    "TranscodePro",
    "HighSpeedHd",
    "Snapshot",
    "Animation",
    "SmartCover",
    "Concat",
    "FillConcat",
    "VideoMontage",
    "VideoProcess",
    "VoiceSeparate",
    "NoiseReduction",
    "SuperResolution",
    "SDRtoHDR",
    "VideoEnhance",
    "DigitalWatermark",
    "ExtractDigitalWatermark",
    "Watermark",
    "StreamExtract",
    "Segment",
    "SegmentVideoBody",
    "MediaInfo",
    "QualityEstimate",
    "VideoTag",
    "VideoTargetRec",
    "Tts",
    "SpeechRecognition",
    "SoundHound",
    "VocalScore",
    "GeneratePlayList",
    "SplitVideoParts",
    "VideoSynthesis",
    "PosterProduction",
    "DNA",
    "PicProcess",
    "ImageInspect",
    "ImageOCR",
    "Translation",
    "WordsGeneralize",
    "DocProcess",
    "DocWatermark",
    "DocAIGCMetadata",
    "FileCompress",
    "FileUncompress",
    "FileHashCode",
)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(text: str) -> str:
    """`text` with its ASCII letters lowered, as SQLite's `lower()` does (and
    PostgreSQL's, on text in the "C" collation): how routes and filters ignore case."""
    return text.translate(_ASCII_LOWER)


def canonical(value: str, known: tuple[str, ...] | list[str]) -> str | None:
    """The known spelling of `value`, compared without case (`fold`); None if it is not
    known."""
    folded = fold(value)
    return next((name for name in known if fold(name) == folded), None)
