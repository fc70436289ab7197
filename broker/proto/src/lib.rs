//! The broker protocol: filled by the broker issue.
