//! Reading YAML input: bounded reads (a huge file, `/dev/zero` or a runaway pipe is refused
//! instead of exhausting memory) and UTF-8 checks that name the line of the first bad byte.

use std::io::Read;
use std::path::Path;

use super::Error;

/// Largest configuration or manifest file tcpshift reads: far above any real one (10 000
/// services with 16 subsets each take a few MiB), and low enough that `/dev/zero`, a
/// runaway pipe or a huge file is refused instead of exhausting memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

fn too_large() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::FileTooLarge,
        format!(
            "larger than {} MiB, the most tcpshift reads; expected a YAML file",
            MAX_FILE_BYTES >> 20
        ),
    )
}

/// Reads `reader` to its end, refusing more than [`MAX_FILE_BYTES`] bytes.
pub fn read_limited(reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads the file at `path`, refusing more than [`MAX_FILE_BYTES`] bytes (a regular file
/// that large without reading it; devices and pipes after that many bytes).
pub fn read_file_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    read_limited(file)
}

/// `bytes` as text, or [`Error::NotUtf8`] naming `file` and the line of the first invalid
/// byte.
pub fn utf8(bytes: Vec<u8>, file: &str) -> Result<String, Error> {
    String::from_utf8(bytes).map_err(|err| {
        let valid = err.utf8_error().valid_up_to();
        let line = 1 + err
            .as_bytes()
            .iter()
            .take(valid)
            .filter(|&&b| b == b'\n')
            .count();
        Error::NotUtf8 {
            file: file.to_owned(),
            line,
        }
    })
}

/// Reads the text of `file` (`-`: standard input, named `<stdin>`), bounded and checked as
/// UTF-8. Returns the text and the name messages use.
pub fn read_text(file: &str) -> Result<(String, String), Error> {
    let (bytes, name) = if file == "-" {
        let name = "<stdin>".to_owned();
        match read_limited(std::io::stdin()) {
            Ok(bytes) => (bytes, name),
            Err(error) => return Err(Error::Read { file: name, error }),
        }
    } else {
        match read_file_limited(Path::new(file)) {
            Ok(bytes) => (bytes, file.to_owned()),
            Err(error) => {
                return Err(Error::Read {
                    file: file.to_owned(),
                    error,
                });
            }
        }
    };
    Ok((utf8(bytes, &name)?, name))
}
