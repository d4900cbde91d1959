//! The deterministic answers the mock server gives, as pure functions tests can call to predict them.

/// At most this many characters of the last user message are echoed by the chat endpoint.
pub const ECHO_CHARS: usize = 200;

/// Marker that makes the completions endpoint copy the answer unchanged.
pub const COPY_MARKER: &str = "COPY";

/// The first `n` characters of `s` (whole `s` when shorter), on a char boundary.
pub fn truncate_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((idx, _)) => &s[..idx],
        None => s,
    }
}

/// Whitespace-separated words in `s` (the mock's notion of a token).
pub fn word_count(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Applies `max_tokens`: when the text has more words than allowed it is cut to the first
/// `max_tokens` words joined by single spaces and the finish reason is `length`.
pub fn apply_max_tokens(text: String, max_tokens: Option<u64>) -> (String, &'static str) {
    match max_tokens {
        Some(max) if word_count(&text) > max => {
            let cut: Vec<&str> = text.split_whitespace().take(max as usize).collect();
            (cut.join(" "), "length")
        }
        _ => (text, "stop"),
    }
}

/// Chat answer before `max_tokens`: `"answer: " + last user message` (truncated to
/// [`ECHO_CHARS`] characters), prefixed with `"[{model}] "` when the model name contains `ckpt`.
pub fn chat_text(model: &str, last_user: &str) -> String {
    let echo = truncate_chars(last_user, ECHO_CHARS);
    if model.contains("ckpt") {
        format!("[{model}] answer: {echo}")
    } else {
        format!("answer: {echo}")
    }
}

/// A chat whose last user message starts with this is an Aligner's rendered template (the
/// built-in templates' opening), corrected like a raw completion.
pub const ALIGNER_MARKER: &str = "BEGINNING OF CONVERSATION:";

/// A chat request with this text in any message is a pairwise judge request.
pub const JUDGE_MARKER: &str = "impartial judge";

/// The text between `[Response X]` and `[End of response X]` in a judge request.
fn response(user: &str, x: char) -> Option<&str> {
    let start = format!("[Response {x}]");
    let end = format!("[End of response {x}]");
    let from = user.find(&start)? + start.len();
    let to = user[from..].find(&end)? + from;
    Some(user[from..to].trim())
}

/// A judge's answer to a pairwise request: some reasoning, then `[[A]]` or `[[B]]` for the
/// response with more characters. On a tie it says `[[A]]` (a position bias, so the two
/// orders of an equal pair disagree); without both responses, no verdict.
pub fn judge_text(user: &str) -> String {
    let (Some(a), Some(b)) = (response(user, 'A'), response(user, 'B')) else {
        return "I cannot find the two responses to compare.".into();
    };
    let (la, lb) = (a.chars().count(), b.chars().count());
    let pick = if lb > la { 'B' } else { 'A' };
    format!(
        "Response A has {la} characters and response B has {lb}; the longer one says more.\nFinal verdict: [[{pick}]]"
    )
}

/// The answer part of an Aligner correction prompt: the text between the last `" | "` and the
/// trailing `" ASSISTANT:"`. Without `" | "` the whole prompt is used; without the trailing
/// marker everything after `" | "` is.
pub fn extract_answer(prompt: &str) -> &str {
    let Some(idx) = prompt.rfind(" | ") else {
        return prompt;
    };
    let after = &prompt[idx + 3..];
    let trimmed = after.trim_end();
    match trimmed.strip_suffix("ASSISTANT:") {
        Some(rest) => rest.strip_suffix(' ').unwrap_or(rest),
        None => after,
    }
}

/// The next sentence of a `stream-aligner-v1` step (sentence-by-sentence correction), whose
/// correction here is the sentence in capitals.
pub fn stream_step_sentence(prompt: &str) -> Option<&str> {
    let from = prompt.rfind(" | Next sentence: ")? + " | Next sentence: ".len();
    let rest = &prompt[from..];
    Some(rest.strip_suffix(" ASSISTANT:").unwrap_or(rest))
}

/// Completions answer before `max_tokens`: the answer part unchanged when the prompt contains
/// [`COPY_MARKER`], else `"I corrected this: " + answer` (a sentence step: the sentence in
/// capitals).
pub fn correction_text(prompt: &str) -> String {
    if let Some(sentence) = stream_step_sentence(prompt) {
        return sentence.to_uppercase();
    }
    let answer = extract_answer(prompt);
    if prompt.contains(COPY_MARKER) {
        answer.to_string()
    } else {
        format!("I corrected this: {answer}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: What is 2+2? | It is 4. ASSISTANT:";

    #[test]
    fn extracts_answer() {
        assert_eq!(extract_answer(P), "It is 4.");
        assert_eq!(extract_answer("a | b | c ASSISTANT:  "), "c");
        assert_eq!(extract_answer("no separator"), "no separator");
        assert_eq!(
            extract_answer("q | tail without marker"),
            "tail without marker"
        );
    }

    #[test]
    fn correction_and_copy() {
        assert_eq!(correction_text(P), "I corrected this: It is 4.");
        let copy = P.replace("What is", "COPY What is");
        assert_eq!(correction_text(&copy), "It is 4.");
    }

    #[test]
    fn chat_and_truncation() {
        assert_eq!(chat_text("mock", "hi"), "answer: hi");
        assert_eq!(chat_text("m-ckpt-3", "hi"), "[m-ckpt-3] answer: hi");
        let long = "é".repeat(300);
        assert_eq!(
            chat_text("m", &long).chars().count(),
            "answer: ".len() + ECHO_CHARS
        );
        assert_eq!(
            apply_max_tokens("a b  c d".into(), Some(2)),
            ("a b".to_string(), "length")
        );
        assert_eq!(
            apply_max_tokens("a b".into(), Some(2)),
            ("a b".to_string(), "stop")
        );
        assert_eq!(
            apply_max_tokens("a b".into(), None),
            ("a b".to_string(), "stop")
        );
    }
}
