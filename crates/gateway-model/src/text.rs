//! Rules for text that people read: names and messages shown in listings and terminals.

/// Characters that show nothing themselves but change how the text around them reads:
/// zero-width spaces and joiners, soft hyphens, and the bidirectional marks, embeddings,
/// overrides and isolates. With them `admin\u{200b}` reads as `admin`, and a right-to-left
/// override turns a name around on screen.
pub fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_formatting_characters() {
        for c in ['\u{200b}', '\u{202e}', '\u{2066}', '\u{feff}', '\u{ad}'] {
            assert!(is_invisible_format(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '日', '\u{3000}', '-'] {
            assert!(!is_invisible_format(c), "{c:?}");
        }
    }
}
