//! The runtime's modules form layers with one direction: no file imports
//! from a layer above its own, and no two files import each other, however
//! indirectly. docs/ARCHITECTURE.md draws the same layers.
//!
//! Reads `runtime/src` as text: every `use` and every `crate::`/`super::`
//! path in code is resolved to the file that defines it, following
//! re-exports (`pub use`) to where an item really lives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first: a file may import from its own layer and the
/// ones below. A file belongs to the layer of the longest module path
/// listed that contains it.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation",
        &["error", "context", "trace", "process", "boxed", "histogram"],
    ),
    ("wire", &["wire"]),
    (
        "core",
        &[
            "settings",
            "retry",
            "spec",
            "storage",
            "metrics",
            "otel",
            "micro",
            "handler",
            "heartbeat",
            "stream",
            "txn::state",
            "txn::lease",
            "txn::route",
            "durable::streams",
        ],
    ),
    (
        "client and stores",
        &[
            "client",
            "objects::bytes",
            "objects::external",
            "objects::jetstream",
            "objects::store",
        ],
    ),
    (
        "caller and worker sides",
        &["request", "durable", "txn", "objects", "worker"],
    ),
    (
        "instances",
        &["scaler", "backend", "supervisor", "permissions", "k8s"],
    ),
    (
        "process set-up",
        &["local", "init", "__private", "testing", ""],
    ),
];

/// A source file: its module path and what it says.
struct File {
    path: PathBuf,
    module: Vec<String>,
    text: String,
}

/// An import: the file it is in, its line, and the path it names.
struct Import {
    file: usize,
    line: usize,
    path: Vec<String>,
    /// A `pub use` or `pub(crate) use`: an alias, not a dependency.
    reexport: bool,
}

fn source_files() -> Vec<File> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "bin" {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&root).unwrap();
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|m| m == "mod" || m == "lib") {
                module.pop();
            }
            // `#[path = "macro_support.rs"] pub mod __private;` in lib.rs.
            if module == ["macro_support"] {
                module = vec!["__private".to_owned()];
            }
            let text = std::fs::read_to_string(&path).unwrap();
            files.push(File { path, module, text });
        }
    }
    files.sort_by(|a, b| a.module.cmp(&b.module));
    files
}

/// The code of a file with comments and string literals blanked out (kept
/// the same length, so line numbers hold), and `#[cfg(test)]` modules cut.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                out.push(' ');
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                    out.push(' ');
                }
            }
            '"' => {
                out.push(' ');
                let mut escaped = false;
                for c in chars.by_ref() {
                    out.push(if c == '\n' { '\n' } else { ' ' });
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
            }
            // A char literal such as '"' or '{' (not a lifetime).
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                let mut it = rest.chars();
                let literal = matches!(
                    (it.next(), it.next()),
                    (Some('\\'), _) | (Some(_), Some('\''))
                );
                out.push(' ');
                if literal {
                    for c in chars.by_ref() {
                        out.push(' ');
                        if c == '\'' {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Expands a use tree (`a::{b, c::{d as e}, self}`) into paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn tokens(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c.is_alphanumeric() || c == '_' || c == '*' {
                word.push(c);
                continue;
            }
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            match c {
                ':' if chars.peek() == Some(&':') => {
                    chars.next();
                }
                '{' | '}' | ',' => out.push(c.to_string()),
                _ => {}
            }
        }
        if !word.is_empty() {
            out.push(word);
        }
        out
    }
    fn parse(tokens: &[String], at: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        let mut path = prefix;
        while *at < tokens.len() {
            let token = tokens[*at].as_str();
            *at += 1;
            match token {
                "{" => {
                    loop {
                        parse(tokens, at, path.clone(), out);
                        match tokens.get(*at).map(String::as_str) {
                            Some(",") => *at += 1,
                            Some("}") => {
                                *at += 1;
                                break;
                            }
                            _ => break,
                        }
                        if tokens.get(*at).map(String::as_str) == Some("}") {
                            *at += 1;
                            break;
                        }
                    }
                    return;
                }
                "," | "}" => {
                    *at -= 1;
                    break;
                }
                "as" => {
                    // The alias names the same item.
                    *at += 1;
                }
                "self" if !path.is_empty() => {}
                _ => path.push(token.to_owned()),
            }
        }
        out.push(path);
    }
    let tokens = tokens(tree);
    let mut out = Vec::new();
    let mut at = 0;
    parse(&tokens, &mut at, Vec::new(), &mut out);
    out
}

fn imports(files: &[File]) -> Vec<Import> {
    let mut all = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let code = code(&file.text);
        let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
        let mut in_use = vec![false; code.len()];
        // `use` statements, possibly over several lines.
        let mut search = 0;
        while let Some(found) = code[search..].find("use ") {
            let start = search + found;
            search = start + 4;
            let before = code[..start].trim_end_matches([' ', '\t']);
            let line_start = before.rfind('\n').map_or(0, |n| n + 1);
            let lead = before[line_start..].trim();
            let starts_statement = lead.is_empty()
                || lead == "pub"
                || lead.starts_with("pub(")
                || lead.starts_with("#[");
            let word_start = start == 0
                || !code[..start]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_');
            if !starts_statement || !word_start {
                continue;
            }
            let Some(end) = code[start..].find(';') else {
                continue;
            };
            let end = start + end;
            in_use[start..end].iter_mut().for_each(|b| *b = true);
            let reexport = lead.starts_with("pub");
            for path in expand(&code[start + 4..end]) {
                all.push(Import {
                    file: index,
                    line: line_of(start),
                    path,
                    reexport,
                });
            }
        }
        // Paths in code: `crate::a::b(..)`, `super::c::D`.
        for root in ["crate::", "super::"] {
            let mut search = 0;
            while let Some(found) = code[search..].find(root) {
                let start = search + found;
                search = start + root.len();
                let preceded = code[..start]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
                if in_use[start] || preceded {
                    continue;
                }
                let rest: String = code[start..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let path: Vec<String> = rest
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                all.push(Import {
                    file: index,
                    line: line_of(start),
                    path,
                    reexport: false,
                });
            }
        }
    }
    all
}

/// Resolves imports to the files that define what they name.
struct Resolver<'a> {
    files: &'a [File],
    by_module: BTreeMap<Vec<String>, usize>,
    /// Per file, the names it re-exports and the absolute paths they stand for.
    aliases: BTreeMap<usize, BTreeMap<String, Vec<String>>>,
}

impl<'a> Resolver<'a> {
    fn new(files: &'a [File], imports: &[Import]) -> Resolver<'a> {
        let by_module = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        let mut resolver = Resolver {
            files,
            by_module,
            aliases: BTreeMap::new(),
        };
        for import in imports.iter().filter(|i| i.reexport) {
            if let Some(absolute) = resolver.absolute(import.file, &import.path) {
                if let Some(name) = absolute.last() {
                    resolver
                        .aliases
                        .entry(import.file)
                        .or_default()
                        .insert(name.clone(), absolute);
                }
            }
        }
        resolver
    }

    /// `path` as seen from `file`, made absolute; `None` for other crates.
    fn absolute(&self, file: usize, path: &[String]) -> Option<Vec<String>> {
        let here = &self.files[file].module;
        let first = path.first()?;
        let mut module = match first.as_str() {
            "crate" => Vec::new(),
            "self" => here.clone(),
            "super" => {
                let mut parent = here.clone();
                let mut rest = path;
                while rest.first().is_some_and(|s| s == "super") {
                    parent.pop();
                    rest = &rest[1..];
                }
                parent.extend(rest.iter().cloned());
                return Some(parent);
            }
            // A child module of this one (2018 paths), else another crate.
            name => {
                let mut child = here.clone();
                child.push(name.to_owned());
                if self.by_module.contains_key(&child) {
                    child.extend(path[1..].iter().cloned());
                    return Some(child);
                }
                return None;
            }
        };
        module.extend(path[1..].iter().cloned());
        Some(module)
    }

    /// The file defining what absolute `path` names.
    fn file_of(&self, path: &[String], depth: usize) -> Option<usize> {
        // The longest prefix that is a module.
        let mut length = path.len();
        let file = loop {
            if let Some(&file) = self.by_module.get(&path[..length]) {
                break file;
            }
            if length == 0 {
                return None;
            }
            length -= 1;
        };
        // An item re-exported there lives elsewhere.
        if let Some(name) = path.get(length) {
            if let Some(target) = self.aliases.get(&file).and_then(|a| a.get(name)) {
                if depth < 8 && target.as_slice() != path {
                    let mut target = target.clone();
                    target.extend(path[length + 1..].iter().cloned());
                    return self.file_of(&target, depth + 1);
                }
            }
        }
        Some(file)
    }
}

fn layer_of(module: &[String]) -> usize {
    let name = module.join("::");
    let mut best: Option<(usize, usize)> = None;
    for (index, (_, members)) in LAYERS.iter().enumerate() {
        for member in members.iter() {
            let contains =
                member.is_empty() || name == *member || name.starts_with(&format!("{member}::"));
            if contains && best.is_none_or(|(length, _)| member.len() > length) {
                best = Some((member.len(), index));
            }
        }
    }
    best.map(|(_, layer)| layer)
        .unwrap_or_else(|| panic!("module `{name}` is in no layer: add it to LAYERS"))
}

/// File-to-file dependencies, with one line that makes each.
fn edges(files: &[File]) -> BTreeMap<(usize, usize), (usize, String)> {
    let imports = imports(files);
    let resolver = Resolver::new(files, &imports);
    let mut edges = BTreeMap::new();
    for import in imports.iter().filter(|i| !i.reexport) {
        let Some(absolute) = resolver.absolute(import.file, &import.path) else {
            continue;
        };
        let Some(target) = resolver.file_of(&absolute, 0) else {
            continue;
        };
        if target != import.file {
            edges
                .entry((import.file, target))
                .or_insert((import.line, import.path.join("::")));
        }
    }
    edges
}

fn name(file: &File) -> String {
    let at = file.path.to_string_lossy();
    at[at.find("src/").unwrap_or(0)..].to_owned()
}

#[test]
fn imports_point_down_and_never_in_a_circle() {
    let files = source_files();
    let edges = edges(&files);
    assert!(
        edges.len() > 100,
        "the parser found too few imports: {}",
        edges.len()
    );

    let mut upward = Vec::new();
    for (&(from, to), (line, path)) in &edges {
        let (a, b) = (layer_of(&files[from].module), layer_of(&files[to].module));
        if b > a {
            upward.push(format!(
                "{}:{line} ({}) imports `{path}` from {} ({})",
                name(&files[from]),
                LAYERS[a].0,
                name(&files[to]),
                LAYERS[b].0
            ));
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up a layer:\n{}",
        upward.join("\n")
    );

    // Strongly connected components (Tarjan): any with two files is a cycle.
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
    for &(from, to) in edges.keys() {
        next[from].push(to);
    }
    let cycles = components(&next)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|component| {
            let members: BTreeSet<usize> = component.iter().copied().collect();
            let lines: Vec<String> = edges
                .iter()
                .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                .map(|((a, b), (line, path))| {
                    format!(
                        "  {}:{line} -> {} (`{path}`)",
                        name(&files[*a]),
                        name(&files[*b])
                    )
                })
                .collect();
            lines.join("\n")
        })
        .collect::<Vec<_>>();
    assert!(
        cycles.is_empty(),
        "files that import each other:\n{}",
        cycles.join("\n\n")
    );
}

#[test]
fn lib_rs_only_declares_modules_and_reexports() {
    let files = source_files();
    let lib = files.iter().find(|f| f.module.is_empty()).unwrap();
    let code = code(&lib.text);
    let mut statement = String::new();
    for line in code.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("#[") || line.starts_with("//") {
            continue;
        }
        statement.push_str(line);
        statement.push(' ');
        if !line.ends_with(';') {
            continue;
        }
        let item = statement.trim().to_owned();
        statement.clear();
        let allowed = [
            "mod ",
            "pub mod ",
            "pub(crate) mod ",
            "pub use ",
            "pub(crate) use ",
        ]
        .iter()
        .any(|start| item.starts_with(start));
        assert!(
            allowed,
            "lib.rs holds more than modules and re-exports: `{item}`"
        );
    }
    assert!(statement.trim().is_empty(), "lib.rs ends in `{statement}`");
}

#[test]
fn the_parser_reads_use_trees() {
    let paths = expand("crate::wire::{self, codec::Codec, reply::{one_line as line, spilled}}");
    let text: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        text,
        [
            "crate::wire",
            "crate::wire::codec::Codec",
            "crate::wire::reply::one_line",
            "crate::wire::reply::spilled"
        ]
    );
}

fn components(next: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        next: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        counter: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State, v: usize) {
        s.index[v] = Some(s.counter);
        s.low[v] = s.counter;
        s.counter += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for i in 0..s.next[v].len() {
            let w = s.next[v][i];
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(index) if s.on_stack[w] => s.low[v] = s.low[v].min(index),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            s.out.push(component);
        }
    }
    let n = next.len();
    let mut state = State {
        next,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        counter: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if state.index[v].is_none() {
            visit(&mut state, v);
        }
    }
    state.out
}
