//! YAML streams and documents: splitting a stream into documents, the checks done before the
//! YAML parser sees a text (nesting depth, blank text, a second document), and moving the
//! lines of a document's errors to the lines of its file.

use serde::Deserialize;

use super::{Error, Located};

/// Splits a YAML stream into documents at the document markers: a `---` line starts a
/// document (unless nothing but comments and directives came before it in the current one),
/// a `...` line ends one. Returns each document's first line (0-based) and text.
pub fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0usize;
    let mut has_content = false;
    let mut has_marker = false;
    let mut offset = 0usize;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = |m: &str| {
            bare.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        // A second `---` with nothing between starts a document too (the first is empty).
        if marker("---") && (has_content || has_marker) {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = line_no;
            has_content = false;
        }
        offset += line.len();
        if marker("...") {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = line_no + 1;
            has_content = false;
            has_marker = false;
            continue;
        }
        has_marker |= marker("---");
        let t = bare.trim_start();
        let content = !(t.is_empty()
            || t.starts_with('#')
            || (bare.starts_with('%') && !has_content)
            || marker("---") && bare.trim_start_matches('-').trim().is_empty());
        has_content |= content;
    }
    if start < text.len() {
        docs.push((start_line, &text[start..]));
    }
    docs
}

/// Deepest nesting of flow collections (`[...]`, `{...}`) handed to the YAML parser. serde_yaml
/// refuses more than 128 levels anyway, but only after libyaml has scanned the whole text, in
/// time quadratic in the depth: 100 000 `{a: ` (400 KB) take over a minute.
pub const MAX_FLOW_NESTING: usize = 512;

/// Refuses text whose flow collections nest deeper than [`MAX_FLOW_NESTING`], before the YAML
/// parser sees it; returns the 1-based line and column of the first bracket too deep. The
/// count is approximate but never refuses what the parser would accept: brackets in comments
/// and quoted strings are skipped, and one counts only where a collection can start (after a
/// line's indentation, `[`, `{`, `,`, `:`, `-` or `?`). `file` names the text in the error.
pub fn check_flow_nesting(text: &str, file: &str) -> Result<(), Error> {
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    let mut prev = '\n'; // the last character that is not a space or tab
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut spaced = true; // the last character was a space, a tab or a line break
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
            comment = false;
            prev = '\n';
            spaced = true;
            continue;
        }
        if comment {
            continue;
        }
        if let Some(q) = quote {
            if q == '"' && c == '\\' {
                chars.next();
                column += 1;
            } else if c == q {
                quote = None;
                prev = c;
            }
            continue;
        }
        match c {
            ' ' | '\t' => {
                spaced = true;
                continue;
            }
            '#' if spaced => comment = true,
            '\'' | '"' if matches!(prev, '\n' | '[' | '{' | ',' | ':' | '-' | '?') => {
                quote = Some(c)
            }
            '[' | '{' if matches!(prev, '\n' | '[' | '{' | ',' | ':' | '-' | '?') => {
                depth += 1;
                if depth > MAX_FLOW_NESTING {
                    return Err(Located::new(
                        file,
                        format!(
                            "collections nested deeper than {MAX_FLOW_NESTING} levels; \
                             expected a tcpshift configuration or Istio objects"
                        ),
                    )
                    .at(Some(line), Some(column))
                    .into());
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
        spaced = false;
    }
    Ok(())
}

/// `err`, or, when it has no location, the first located error of the documents of `text`
/// read one by one. serde_yaml reports text after the end of a document (`'a' b`, `{a: 1} x`)
/// as "more than one document" without a location; libyaml's own syntax error for the second
/// document has one.
pub fn yaml_error_with_location(text: &str, err: serde_yaml::Error) -> serde_yaml::Error {
    if err.location().is_some() {
        return err;
    }
    serde_yaml::Deserializer::from_str(text)
        .take(64)
        .find_map(|doc| {
            serde_yaml::Value::deserialize(doc)
                .err()
                .filter(|e| e.location().is_some())
        })
        .unwrap_or(err)
}

/// 1-based line of the `---` marker that starts a second document in `text`, if any.
pub fn second_document_line(text: &str) -> Option<usize> {
    let mut content = false;
    for (i, line) in text.lines().enumerate() {
        let bare = line.trim_end();
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && content {
            return Some(i + 1);
        }
        let t = bare.trim_start();
        content |= !(t.is_empty() || t.starts_with('#') || t.starts_with('%') || marker);
        content |= marker && !bare[3..].trim().is_empty() && !bare[3..].trim().starts_with('#');
    }
    None
}

/// True when `text` holds no YAML content: only blank lines, comments and document markers.
pub fn is_blank(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    })
}

/// Adds `lines` to every "at line N" in a YAML parser message (which counts lines from the
/// start of one document of a multi-document file).
pub fn shift_line_mentions(message: &str, lines: usize) -> String {
    const NEEDLE: &str = "at line ";
    if lines == 0 {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(NEEDLE) {
        let (before, after) = rest.split_at(i + NEEDLE.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + lines).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Parses the one YAML document `text` (of `file`) as a `T`. Deep nesting is refused before
/// the parser runs; parser errors carry their line and column, and text after the end of
/// the document is reported at the `---` line that starts it, with `second_document` as the
/// message. `Ok(None)` when `text` is blank (only comments and markers) and not a `T`.
pub fn parse_one<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
    second_document: &str,
) -> Result<Option<T>, Error> {
    check_flow_nesting(text, file)?;
    match serde_yaml::from_str::<T>(text) {
        Ok(value) => Ok(Some(value)),
        Err(_) if is_blank(text) => Ok(None),
        Err(err) => {
            let err = yaml_error_with_location(text, err);
            if err.location().is_none()
                && let Some(line) = second_document_line(text)
            {
                return Err(Located::new(file, second_document)
                    .at(Some(line), None)
                    .into());
            }
            Err(Located::from_yaml(file, 0, &err).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_at_markers() {
        let docs = split_documents("a: 1\n---\nb: 2\n...\nc: 3\n--- {d: 4}\n");
        let texts: Vec<(usize, &str)> = docs;
        assert_eq!(
            texts,
            [
                (0, "a: 1\n"),
                (1, "---\nb: 2\n...\n"),
                (4, "c: 3\n"),
                (5, "--- {d: 4}\n")
            ]
        );
        // A leading marker, comments and directives stay with the document that follows.
        assert_eq!(
            split_documents("# c\n%YAML 1.2\n---\na: 1\n"),
            [(0, "# c\n%YAML 1.2\n---\na: 1\n")]
        );
        // `---` inside a line, or indented, is content.
        assert_eq!(
            split_documents("a: |\n  ---\n  x\nb: ---x\n"),
            [(0, "a: |\n  ---\n  x\nb: ---x\n")]
        );
        assert_eq!(split_documents(""), []);
        // Two markers: two (empty) documents, as the YAML parser sees them.
        assert_eq!(split_documents("---\n---\n"), [(0, "---\n"), (1, "---\n")]);
        // CRLF line ends.
        assert_eq!(
            split_documents("a: 1\r\n---\r\nb: 2\r\n"),
            [(0, "a: 1\r\n"), (1, "---\r\nb: 2\r\n")]
        );
    }
}
