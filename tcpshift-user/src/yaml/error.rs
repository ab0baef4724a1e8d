//! The one error type of the YAML parsers: what went wrong, and where (file, line, column,
//! object, field).

use std::fmt;

/// Why a YAML input (the loader's configuration, the files of an apply) was refused.
/// Nothing was changed. Every message names the file and, when known, the line, column,
/// object and field, and says what is expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    // The I/O error is in the message and not a `#[source]`: `{:#}` would repeat it.
    #[error("{file}: cannot read: {error}")]
    Read {
        /// The file as named on the command line.
        file: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A file is not UTF-8 text.
    #[error("{file}:{line}: not valid UTF-8; expected YAML text")]
    NotUtf8 {
        /// The file.
        file: String,
        /// 1-based line of the first invalid byte.
        line: usize,
    },
    /// Nothing but blank lines, comments and document markers.
    #[error("{file}: {message}")]
    Empty {
        /// The file (or files) read.
        file: String,
        /// What is expected instead.
        message: String,
    },
    /// Invalid YAML, a value of the wrong type or format, or values that do not fit together.
    #[error("{0}")]
    Invalid(Box<Located>),
}

/// An error at a place in a file (see [`Error::Invalid`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The object, e.g. `VirtualService tcp-echo`, when known.
    pub object: Option<String>,
    /// The field, e.g. `spec.tcp[0].route[1].weight`, when it is not already at the start of
    /// `message`.
    pub field: Option<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl Located {
    /// An error about `file` with only a message.
    pub fn new(file: &str, message: impl Into<String>) -> Located {
        Located {
            file: file.to_owned(),
            line: None,
            column: None,
            object: None,
            field: None,
            message: message.into(),
        }
    }

    /// With the 1-based `line` and `column`.
    pub fn at(mut self, line: Option<usize>, column: Option<usize>) -> Located {
        self.line = line;
        self.column = column;
        self
    }

    /// With the field path `field`.
    pub fn field(mut self, field: impl Into<String>) -> Located {
        self.field = Some(field.into());
        self
    }

    /// With the object `object` (`VirtualService NAME`).
    pub fn object(mut self, object: Option<String>) -> Located {
        self.object = object;
        self
    }

    /// A YAML parser error in a document of `file` that starts after `offset` lines: the
    /// location goes in front of the message, the lines it mentions count from the start of
    /// the file.
    pub fn from_yaml(file: &str, offset: usize, err: &serde_yaml::Error) -> Located {
        let mut message = err.to_string();
        let (line, column) = match err.location() {
            Some(loc) => {
                // serde_yaml appends " at line L column C"; the location goes in front instead.
                let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                message = super::documents::shift_line_mentions(
                    &message.replacen(&suffix, "", 1),
                    offset,
                );
                (Some(loc.line() + offset), Some(loc.column()))
            }
            None => (None, None),
        };
        Located::new(file, message).at(line, column)
    }
}

impl fmt::Display for Located {
    /// `FILE:LINE:COLUMN: OBJECT: FIELD: MESSAGE`, leaving out what is not known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, ":{l}:{c}")?,
            (Some(l), None) => write!(f, ":{l}")?,
            _ => {}
        }
        f.write_str(": ")?;
        if let Some(o) = &self.object {
            write!(f, "{}: ", clip(o))?;
        }
        if let Some(field) = &self.field {
            write!(f, "{}: ", clip(field))?;
        }
        f.write_str(&clip(&self.message))
    }
}

impl From<Located> for Error {
    fn from(l: Located) -> Self {
        Error::Invalid(Box::new(l))
    }
}

impl Error {
    /// 1-based line and column of the error, when known.
    pub fn location(&self) -> Option<(usize, Option<usize>)> {
        match self {
            Error::Invalid(l) => l.line.map(|line| (line, l.column)),
            _ => None,
        }
    }

    /// The error with its line (and the lines its message mentions) moved by `lines`, for a
    /// document that starts on line `lines + 1` of a multi-document file.
    pub fn shift_lines(self, lines: usize) -> Error {
        match self {
            Error::Invalid(mut l) if l.line.is_some() => {
                l.line = l.line.map(|n| n + lines);
                l.message = super::documents::shift_line_mentions(&l.message, lines);
                Error::Invalid(l)
            }
            other => other,
        }
    }
}

/// Longest quoted value and whole message in an error: values come from files and command
/// lines, and a message must not repeat megabytes of them.
const MAX_QUOTED: usize = 80;
const MAX_MESSAGE: usize = 2000;

/// `message` with every double-quoted value longer than [`MAX_QUOTED`] characters cut in the
/// middle (`"aaaa…aaaa" (N bytes)`), and the whole cut at [`MAX_MESSAGE`] characters.
pub fn clip(message: &str) -> String {
    if message.len() <= MAX_QUOTED {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE + 16));
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        // The closing quote: the next one not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let inner = &rest[..end.unwrap_or(rest.len())];
        let count = inner.chars().count();
        if count > MAX_QUOTED {
            let head: String = inner.chars().take(MAX_QUOTED / 2).collect();
            let tail: String = inner.chars().skip(count - MAX_QUOTED / 4).collect();
            out.push_str(&format!("{head}…{tail}"));
            if end.is_some() {
                out.push_str(&format!("\" ({} bytes)", inner.len()));
            }
        } else {
            out.push_str(inner);
            if end.is_some() {
                out.push('"');
            }
        }
        rest = match end {
            Some(i) => &rest[i + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    if out.chars().count() > MAX_MESSAGE {
        let total = out.len();
        out = out.chars().take(MAX_MESSAGE).collect();
        out.push_str(&format!("… (message cut, {total} bytes)"));
    }
    out
}

/// A name as a field path segment: as is when it is short and made of name characters,
/// quoted and escaped otherwise.
pub fn seg(name: &str) -> String {
    if !name.is_empty()
        && name.len() <= MAX_QUOTED
        && name.bytes().all(crate::model::service::name_byte_ok)
    {
        name.to_owned()
    } else {
        clip(&format!("{name:?}"))
    }
}
