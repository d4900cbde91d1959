fn hwm() -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        .collect::<Vec<_>>()
        .join(" ")
}
fn main() {
    let p = std::env::args().nth(1).unwrap();
    println!("start {}", hwm());
    let file = aligner_local::gguf::GgufFile::open(std::path::Path::new(&p)).unwrap();
    println!("opened {}", hwm());
    let tok = aligner_local::tokenizer::TextTokenizer::from_gguf(&file.content).unwrap();
    println!("tokenizer {}", hwm());
    let tok2 = aligner_local::tokenizer::TextTokenizer::from_gguf(&file.content).unwrap();
    println!("tokenizer twice {}", hwm());
    drop(tok2);
    println!("second dropped {}", hwm());
    let model = aligner_local::model::Model::from_gguf(&file).unwrap();
    println!("model {} weights {}", hwm(), model.weight_bytes() >> 20);
    drop(file);
    println!("dropped file {}", hwm());
    let _ = tok;
}
