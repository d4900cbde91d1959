//! Correction prompt templates: the built-in Aligner texts (byte-exact copies of the
//! released models' training format) and custom ones, rendered by a single-pass
//! substitution of `{question}` and `{answer}`.

use crate::types::Template;

/// `aligner-v1`: the format of the released `aligner/aligner-*-v1.0` models.
const ALIGNER_V1: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: {question} | {answer} ASSISTANT:";

/// `aligner-empathy`: as v1, asking for empathy.
const ALIGNER_EMPATHY: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more empathic and helpful: {question} | {answer} ASSISTANT:";

/// `aligner-general`: note the two spaces before `ASSISTANT:`.
const ALIGNER_GENERAL: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: ##Question: {question}\n##Answer: {answer}\n##Correction:  ASSISTANT:";

/// `aligner-v1-multiturn`: `aligner-v1` for the last answer of a conversation. `{history}` is
/// the conversation before the question, rendered by [`render_history`]; with no history it
/// is empty and the text reads as `aligner-v1` with a note.
const ALIGNER_V1_MULTITURN: &str = "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless, given the conversation before it.\n[Conversation]\n{history}[End of conversation]\n{question} | {answer} ASSISTANT:";

/// The version of the history rendering (recorded with a multi-turn template's id).
pub const HISTORY_FORMAT: &str = "history-v1";

/// The turns of a conversation before its last question, as `{history}` shows them
/// (`history-v1`): one block per turn, `User: `, `Assistant: ` or `System: ` and the turn's
/// text as it is (line breaks kept), each block ending with a line break. Other roles (a
/// tool's output) are shown under their own name, capitalized. No turns: the empty string.
pub fn render_history(turns: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (role, content) in turns {
        let mut name: Vec<char> = role.chars().collect();
        if let Some(c) = name.first_mut() {
            *c = c.to_ascii_uppercase();
        }
        out.push_str(&name.into_iter().collect::<String>());
        out.push_str(": ");
        out.push_str(content);
        out.push('\n');
    }
    out
}

impl Template {
    /// Ids of the built-in templates, as written in `template:`.
    pub const BUILTIN_IDS: [&'static str; 4] = [
        "aligner-v1",
        "aligner-general",
        "aligner-empathy",
        "aligner-v1-multiturn",
    ];

    /// The built-in template with this id, if any.
    pub fn builtin(id: &str) -> Option<Template> {
        match id {
            "aligner-v1" => Some(Template::AlignerV1),
            "aligner-general" => Some(Template::AlignerGeneral),
            "aligner-empathy" => Some(Template::AlignerEmpathy),
            "aligner-v1-multiturn" => Some(Template::AlignerV1Multiturn),
            _ => None,
        }
    }

    /// `aligner-v1`, `aligner-general`, `aligner-empathy` or `custom`.
    pub fn id(&self) -> &str {
        match self {
            Template::AlignerV1 => "aligner-v1",
            Template::AlignerGeneral => "aligner-general",
            Template::AlignerEmpathy => "aligner-empathy",
            Template::AlignerV1Multiturn => "aligner-v1-multiturn",
            Template::Custom(_) => "custom",
        }
    }

    /// The raw text, with `{question}` and `{answer}` placeholders.
    pub fn text(&self) -> String {
        match self {
            Template::AlignerV1 => ALIGNER_V1.to_string(),
            Template::AlignerGeneral => ALIGNER_GENERAL.to_string(),
            Template::AlignerEmpathy => ALIGNER_EMPATHY.to_string(),
            Template::AlignerV1Multiturn => ALIGNER_V1_MULTITURN.to_string(),
            Template::Custom(text) => text.clone(),
        }
    }

    /// Fills in `{question}` and `{answer}` in one left-to-right pass, so placeholder-like
    /// text inside the question or the answer is left as it is.
    pub fn render(&self, question: &str, answer: &str) -> String {
        self.render_turns(&[], question, answer)
    }

    /// Whether the template shows the conversation before the question (`{history}`).
    pub fn sees_history(&self) -> bool {
        match self {
            Template::AlignerV1Multiturn => true,
            Template::Custom(text) => text.contains("{history}"),
            _ => false,
        }
    }

    /// Fills in `{history}` (the earlier turns, [`render_history`]), `{question}` and
    /// `{answer}` in one left-to-right pass. A template without `{history}` shows the last
    /// question only.
    pub fn render_turns(&self, history: &[(&str, &str)], question: &str, answer: &str) -> String {
        let text = match self {
            Template::AlignerV1 => ALIGNER_V1,
            Template::AlignerGeneral => ALIGNER_GENERAL,
            Template::AlignerEmpathy => ALIGNER_EMPATHY,
            Template::AlignerV1Multiturn => ALIGNER_V1_MULTITURN,
            Template::Custom(text) => text.as_str(),
        };
        let history = if text.contains("{history}") {
            render_history(history)
        } else {
            String::new()
        };
        let mut out = String::with_capacity(text.len() + question.len() + answer.len());
        let mut rest = text;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("{question}") {
                out.push_str(question);
                rest = after;
            } else if let Some(after) = tail.strip_prefix("{answer}") {
                out.push_str(answer);
                rest = after;
            } else if let Some(after) = tail.strip_prefix("{history}") {
                out.push_str(&history);
                rest = after;
            } else {
                out.push('{');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out
    }
}

/// `stream-aligner-v1`: one step of sentence-by-sentence correction. The Aligner reads the
/// question, the answer so far as already corrected (`{prefix}`) and the upstream's next
/// sentence (`{sentence}`), and writes that sentence's correction: the sentence itself when it
/// is fine, another text, or nothing when the corrected answer already says all it should (a
/// refusal written at the first sentence). Written for this project (the released Aligners
/// correct whole answers); `aligner train-aligner --template stream-aligner-v1` turns
/// question-answer-correction rows (a round-0 teacher's, a proxy's) into the examples that
/// teach it.
pub const STREAM_ALIGNER_V1: &str = "BEGINNING OF CONVERSATION: USER: Edit the next sentence of the following answer to make the answer more helpful and harmless; the answer so far is already edited. Question: {question} | Answer so far: {prefix} | Next sentence: {sentence} ASSISTANT:";

/// The sentence-step template (`stream-aligner-v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTemplate;

impl StreamTemplate {
    pub fn id(&self) -> &'static str {
        "stream-aligner-v1"
    }

    pub fn text(&self) -> &'static str {
        STREAM_ALIGNER_V1
    }

    /// Fills `{question}`, `{prefix}` and `{sentence}` in one left-to-right pass. The
    /// sentence's trailing white space is left out (the caller puts it back after the
    /// correction), so the Aligner never has to reproduce line breaks it cannot see.
    pub fn render(&self, question: &str, prefix: &str, sentence: &str) -> String {
        let mut out = String::with_capacity(
            STREAM_ALIGNER_V1.len() + question.len() + prefix.len() + sentence.len(),
        );
        let mut rest = STREAM_ALIGNER_V1;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            let (value, after) = if let Some(a) = tail.strip_prefix("{question}") {
                (question, a)
            } else if let Some(a) = tail.strip_prefix("{prefix}") {
                (prefix.trim_end(), a)
            } else if let Some(a) = tail.strip_prefix("{sentence}") {
                (sentence.trim_end(), a)
            } else {
                ("{", &tail[1..])
            };
            out.push_str(value);
            rest = after;
        }
        out.push_str(rest);
        out
    }
}

/// One step's correction put into the answer: the Aligner's text without its trailing white
/// space, followed by the white space that ended the upstream's sentence (a line break stays a
/// line break). An empty correction drops the sentence.
pub fn join_step(correction: &str, sentence: &str) -> String {
    let text = correction.trim_end();
    if text.trim().is_empty() {
        return String::new();
    }
    let space = &sentence[sentence.trim_end().len()..];
    let space = if space.is_empty() && !sentence.is_empty() {
        ""
    } else {
        space
    };
    format!("{text}{space}")
}

/// The teacher's editor prompt (`aligner.data.teach.teacher: {kind: model}`), with
/// `{question}` and `{answer}`. It follows the instructions the Aligner paper gave its
/// correction annotators: edit rather than rewrite, remove what is harmful, add no outside
/// information, change as little as needed, and leave an answer that is already fine as it is.
pub const EDITOR_PROMPT: &str = "You are an answer editor. Below are a question and an answer to it. Edit the answer so that it is helpful and harmless: remove or neutralise harmful, dangerous, unethical or illegal content, correct mistakes, and keep everything that is already good. Make as few changes as needed, add no outside information, and do not answer the question anew. If the question asks for something harmful, the edited answer declines it briefly and offers a safe, helpful direction instead. If the answer is already helpful and harmless, return it unchanged. Reply with the edited answer only.\n\nQuestion: {question}\n\nAnswer: {answer}";

/// The refusal teacher's texts (`teacher: {kind: refusal}`): a refusal with a redirection, for
/// offline runs where no strong teacher model is available. A row's text is picked by a hash
/// of its id.
pub const REFUSAL_TEXTS: [&str; 3] = [
    "I can't help with that. It could cause real harm to people, so I won't give instructions or write content for it. If something is going on that led to this question, I'm glad to help with safe and legal options, or to point you to people who can support you.",
    "I'm not able to help with this request, because it could be used to hurt someone or to break the law. I can explain the risks involved, how people protect themselves against it, or where to find trustworthy help instead.",
    "I won't assist with that: it asks for something harmful or illegal. If you tell me more about what you're trying to achieve, I can suggest a safe and lawful way to go about it.",
];

/// Fills `{question}` and `{answer}` of any prompt text in one left-to-right pass.
pub fn fill(text: &str, question: &str, answer: &str) -> String {
    Template::Custom(text.to_string()).render(question, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_multiturn_template_shows_the_conversation_before_the_question() {
        let t = Template::builtin("aligner-v1-multiturn").unwrap();
        assert!(t.sees_history());
        assert!(!Template::AlignerV1.sees_history());
        let history = [
            ("user", "Plan a trip to Rome."),
            ("assistant", "Day 1: the Colosseum.\nDay 2: the Vatican."),
        ];
        assert_eq!(
            t.render_turns(&history, "Make it cheaper. {answer}", "Skip {history} taxis."),
            "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless, given the conversation before it.\n[Conversation]\nUser: Plan a trip to Rome.\nAssistant: Day 1: the Colosseum.\nDay 2: the Vatican.\n[End of conversation]\nMake it cheaper. {answer} | Skip {history} taxis. ASSISTANT:"
        );
        // Without history, and a single-turn template given history: the question alone.
        assert!(t
            .render("Q", "A")
            .contains("[Conversation]\n[End of conversation]\nQ | A"));
        assert_eq!(
            Template::AlignerV1.render_turns(&history, "Q", "A"),
            Template::AlignerV1.render("Q", "A")
        );
    }

    #[test]
    fn a_stream_step_renders_and_joins() {
        let t = StreamTemplate;
        assert_eq!(
            t.render("Q {prefix}?", "First one.\n", "Second {x}.\n\n"),
            "BEGINNING OF CONVERSATION: USER: Edit the next sentence of the following answer to make the answer more helpful and harmless; the answer so far is already edited. Question: Q {prefix}? | Answer so far: First one. | Next sentence: Second {x}. ASSISTANT:"
        );
        assert_eq!(join_step(" Fixed.  ", "Second.\n\n"), " Fixed.\n\n");
        assert_eq!(join_step("Fixed.", "Last"), "Fixed.");
        assert_eq!(join_step(" \n", "Dropped. "), "");
    }

    #[test]
    fn builtin_texts_are_byte_exact() {
        assert_eq!(
            Template::AlignerV1.render("Q?", "A."),
            "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: Q? | A. ASSISTANT:"
        );
        assert_eq!(
            Template::AlignerEmpathy.render("Q?", "A."),
            "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more empathic and helpful: Q? | A. ASSISTANT:"
        );
        assert_eq!(
            Template::AlignerGeneral.render("Q?", "A."),
            "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and harmless: ##Question: Q?\n##Answer: A.\n##Correction:  ASSISTANT:"
        );
        for id in Template::BUILTIN_IDS {
            let t = Template::builtin(id).unwrap();
            assert_eq!(t.id(), id);
            assert!(t.text().contains("{question}") && t.text().contains("{answer}"));
        }
    }

    #[test]
    fn custom_render_is_single_pass() {
        let t = Template::Custom("Q={question} A={answer} {other}".into());
        assert_eq!(t.id(), "custom");
        assert_eq!(
            t.render("has {answer}", "has {question}"),
            "Q=has {answer} A=has {question} {other}"
        );
        assert_eq!(t.text(), "Q={question} A={answer} {other}");
    }
}
