//! Maps field paths (`routes[3].match.path`) to where they are written in the YAML text, so
//! errors found after parsing (a dangling cluster name) still point at a line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Positions (1-based line and column) of every key and sequence item in a document.
#[derive(Debug, Default)]
pub struct PositionIndex {
    positions: HashMap<String, (usize, usize)>,
}

impl PositionIndex {
    /// Indexes `text`; text that does not parse gives an empty index (the YAML parser then
    /// reports the syntax error with its own position).
    pub fn new(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self {
            positions: builder.positions,
        }
    }

    /// Where `path` is written, or its closest written ancestor; `(0, 0)` if none is.
    pub fn locate(&self, path: &str) -> (usize, usize) {
        let mut path = path;
        loop {
            if let Some(pos) = self.positions.get(path) {
                return *pos;
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return (0, 0),
            }
        }
    }
}

enum Frame {
    /// `pending` is a sequence item path that takes the position of this mapping's first key
    /// (the parser places a block mapping's start after that key).
    Map {
        path: String,
        key: Option<String>,
        pending: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: not addressable by path.
    Ignored,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, (usize, usize)>,
}

impl Builder {
    /// The path of the node starting now, or `None` if it is a mapping key (recorded) or
    /// lies inside something unaddressable.
    fn slot(&mut self, ev: &Event, mark: Marker) -> Option<String> {
        let pos = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Ignored) => None,
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                if !matches!(ev, Event::MappingStart(..)) {
                    self.positions.entry(p.clone()).or_insert(pos);
                }
                Some(p)
            }
            Some(Frame::Map { path, key, pending }) => match key.take() {
                Some(k) => Some(if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                }),
                None => {
                    if let Event::Scalar(k, ..) = ev {
                        let p = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        self.positions.entry(p).or_insert(pos);
                        if let Some(item) = pending.take() {
                            self.positions.entry(item).or_insert(pos);
                        }
                        *key = Some(k.clone());
                    } else {
                        *key = Some("?".to_string());
                    }
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(..) | Event::Alias(..) => {
                self.slot(&ev, mark);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_key = matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
                let frame = match (self.slot(&ev, mark), is_key) {
                    (Some(path), false) if matches!(ev, Event::MappingStart(..)) => Frame::Map {
                        pending: path.ends_with(']').then(|| path.clone()),
                        path,
                        key: None,
                    },
                    (Some(path), false) => Frame::Seq { path, next: 0 },
                    _ => Frame::Ignored,
                };
                self.stack.push(frame);
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_keys_items_and_ancestors() {
        let text = "routes:\n  - name: a\n    match:\n      path: {prefix: /}\n  - name: b\n";
        let idx = PositionIndex::new(text);
        assert_eq!(idx.locate("routes"), (1, 1));
        assert_eq!(idx.locate("routes[0]"), (2, 5));
        assert_eq!(idx.locate("routes[0].match.path"), (4, 7));
        assert_eq!(idx.locate("routes[0].match.path.prefix"), (4, 14));
        assert_eq!(idx.locate("routes[1].name"), (5, 5));
        assert_eq!(idx.locate("routes[1].route.cluster"), (5, 5));
        assert_eq!(idx.locate("nothing.here"), (0, 0));
    }
}
