//! Shared pieces of the command-line tools: size parsing and human
//! figures.

#![forbid(unsafe_code)]

pub mod units;
