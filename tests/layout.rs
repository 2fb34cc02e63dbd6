//! The module layout stays a house without circles: read from the code's own imports (every
//! `crate::<module>` a file names), no top-level module of `src/` reaches itself through
//! others; the HTTP areas take nothing from `http/mod.rs`, which only merges them; and only
//! the commands, the wiring and the adapter choice read the settings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The code of a file, without its unit tests (which may reach anywhere) and comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The identifiers that follow `prefix` in `text`, including each name of a `prefix{a, b}` list.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let rest = &text[at + prefix.len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let list = &list[..list.find('}').unwrap_or(list.len())];
            names.extend(list.split(',').map(|item| ident(item.trim())).filter(|n| !n.is_empty()));
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// The top-level module a file of `src/` belongs to.
fn top_level(src: &Path, file: &Path) -> String {
    let first = file.strip_prefix(src).unwrap().components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Top-level module → the other top-level modules it names, with the files that do.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in sources(src) {
        let from = top_level(src, &file);
        if from == "main" || from == "lib" {
            continue;
        }
        let shown = file.strip_prefix(src).unwrap().display().to_string();
        for to in names_after(&code(&file), "crate::") {
            if to != from {
                graph.entry(from.clone()).or_default().entry(to).or_default().insert(shown.clone());
            }
        }
    }
    graph
}

/// The circles of `graph` (its strongly connected components of more than one module).
fn circles(graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Vec<BTreeSet<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(at) = todo.pop() {
            for next in graph.get(&at).into_iter().flat_map(|e| e.keys()) {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let mut found: Vec<BTreeSet<String>> = Vec::new();
    for module in graph.keys() {
        let ahead = reach(module);
        if !ahead.contains(module) || found.iter().any(|c| c.contains(module)) {
            continue;
        }
        found.push(ahead.into_iter().filter(|other| reach(other).contains(module)).collect());
    }
    found
}

#[test]
fn no_top_level_module_reaches_itself() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    let found = circles(&graph);
    let mut explain = Vec::new();
    for circle in &found {
        for from in circle {
            for (to, files) in graph[from].iter().filter(|(to, _)| circle.contains(*to)) {
                explain.push(format!("{from} -> {to} ({files:?})"));
            }
        }
    }
    assert!(found.is_empty(), "modules in a circle: {found:?}\n{}", explain.join("\n"));
}

#[test]
fn the_checker_finds_a_circle() {
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph.entry(from.into()).or_default().entry(to.into()).or_default().insert("x.rs".into());
    }
    let found = circles(&graph);
    assert_eq!(found, vec![BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()])]);
    assert_eq!(
        names_after("use crate::{a, b::C};\ncrate::d::e()", "crate::"),
        BTreeSet::from(["a", "b", "d"].map(String::from))
    );
}

#[test]
fn http_areas_take_nothing_from_the_module_that_merges_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    // An area is a file, or a folder of files (its `mod.rs` merges only its own).
    let folders = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir());
    let siblings: BTreeSet<String> = sources(&dir)
        .into_iter()
        .chain(folders)
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "mod")
        .collect();
    let mut offenders = Vec::new();
    for file in sources(&dir).into_iter().filter(|f| *f != dir.join("mod.rs")) {
        let from_parent: Vec<String> =
            names_after(&code(&file), "super::").into_iter().filter(|name| !siblings.contains(name)).collect();
        if !from_parent.is_empty() {
            offenders.push(format!("{}: {from_parent:?}", file.display()));
        }
    }
    assert!(offenders.is_empty(), "take these from their own module, not http/mod.rs: {offenders:?}");
}

#[test]
fn only_commands_wiring_and_backends_read_the_settings() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let readers: BTreeSet<String> = sources(&src)
        .into_iter()
        .filter(|file| names_after(&code(file), "crate::").contains("config"))
        .map(|file| top_level(&src, &file))
        .collect();
    let allowed = BTreeSet::from(["cli", "startup", "backends"].map(String::from));
    assert!(readers.is_subset(&allowed), "config read by {:?}", readers.difference(&allowed).collect::<Vec<_>>());
}
