//! `Rendering`: a JSON array of entities (each projected by `fields` or
//! spliced in as stored, `null` for a missing one) between a fixed head and
//! tail, produced about 64 KiB at a time. Built by `GET /entities` (unpaged)
//! and by-refs; owns what it renders, so it can move to another task. Its
//! chunks concatenate to exactly the bytes a one-piece rendering would be.

use std::sync::Arc;

use bytes::Bytes;

use super::budget::Budget;
use super::error::QueryError;
use super::fields::{render_check_due, write_entity};
use crate::entity::Entity;

/// Bytes a chunk reaches before it is handed out (plus one entity).
const CHUNK_BYTES: usize = 64 * 1024;

/// A large answer, rendered a chunk at a time. The budget is checked before
/// each chunk (and within one, as often as a whole rendering checks it); a
/// spent budget ends the rendering with the error. A consumer that streams
/// has then sent part of the body and must abort it; `into_bytes` returns
/// the error and nothing partial.
#[derive(Clone)]
pub struct Rendering {
    head: Bytes,
    tail: Bytes,
    items: Vec<Option<Arc<Entity>>>,
    fields: Option<Vec<String>>,
    budget: Budget,
    /// The next item to render.
    next: usize,
    /// Whether the head has been handed out.
    started: bool,
    /// Whether the tail (or an error) has been handed out.
    finished: bool,
}

impl std::fmt::Debug for Rendering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendering")
            .field("items", &self.items.len())
            .field("nulls", &self.nulls())
            .field("fields", &self.fields)
            .field("next", &self.next)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Rendering {
    /// `head`, then `[item,…]` (each entity projected by `fields`, or its
    /// stored body without them; `null` for `None`), then `tail`.
    pub fn new(
        head: Bytes,
        items: Vec<Option<Arc<Entity>>>,
        fields: Option<Vec<String>>,
        tail: Bytes,
        budget: Budget,
    ) -> Self {
        Rendering {
            head,
            tail,
            items,
            fields,
            budget,
            next: 0,
            started: false,
            finished: false,
        }
    }

    /// How many items render as `null`.
    pub fn nulls(&self) -> usize {
        self.items.iter().filter(|i| i.is_none()).count()
    }

    /// How many items the array holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The next chunk (about 64 KiB; the first starts with the head, the
    /// last ends with the tail), an error once the budget is spent, or
    /// `None` when everything (or an error) has been handed out.
    pub fn next_chunk(&mut self) -> Option<Result<Bytes, QueryError>> {
        if self.finished {
            return None;
        }
        match self.render_chunk() {
            Ok(chunk) => Some(Ok(chunk)),
            Err(e) => {
                self.finished = true;
                Some(Err(e))
            }
        }
    }

    fn render_chunk(&mut self) -> Result<Bytes, QueryError> {
        self.budget.check()?;
        let mut out = Vec::with_capacity(CHUNK_BYTES + 16 * 1024);
        if !self.started {
            out.extend_from_slice(&self.head);
            out.push(b'[');
            self.started = true;
        }
        let fields = self.fields.as_deref();
        while self.next < self.items.len() && out.len() < CHUNK_BYTES {
            if render_check_due(self.next, fields) {
                self.budget.check()?;
            }
            if self.next > 0 {
                out.push(b',');
            }
            match &self.items[self.next] {
                Some(entity) => write_entity(&entity.body(), fields, &mut out),
                None => out.extend_from_slice(b"null"),
            }
            self.next += 1;
        }
        if self.next == self.items.len() {
            out.push(b']');
            out.extend_from_slice(&self.tail);
            self.finished = true;
        }
        Ok(Bytes::from(out))
    }

    /// Whether the whole body has been handed out.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Replaces the budget the next chunks are rendered within (a streamer
    /// counts only the time spent rendering, not the time the client takes
    /// to read).
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// Every remaining chunk, concatenated (for callers that need it all).
    pub fn into_bytes(mut self) -> Result<Bytes, QueryError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk() {
            let chunk = chunk?;
            if all.is_empty() && self.finished {
                // One chunk: hand it out without copying.
                return Ok(chunk);
            }
            all.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(all))
    }
}

impl Iterator for Rendering {
    type Item = Result<Bytes, QueryError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn entity(i: usize, pad: usize) -> Arc<Entity> {
        let body = json!({"kind": "Component", "metadata": {"name": format!("n{i}"), "uid": format!("u{i}"), "etag": "e",
            "description": "x".repeat(pad)}});
        Arc::new(Entity::from_json(Bytes::from(body.to_string())).unwrap())
    }

    /// The rendering as one piece, written the way answers were before
    /// chunking: head, `[`, items joined by `,`, `]`, tail.
    fn one_piece(
        head: &str,
        items: &[Option<Arc<Entity>>],
        fields: Option<&[String]>,
        tail: &str,
    ) -> Vec<u8> {
        let mut out = head.as_bytes().to_vec();
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match item {
                Some(e) => write_entity(&e.body(), fields, &mut out),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b']');
        out.extend_from_slice(tail.as_bytes());
        out
    }

    #[test]
    fn chunks_concatenate_to_the_one_piece_bytes() {
        let fields = vec!["metadata.name".to_string(), "kind".to_string()];
        for (n, pad) in [(0, 0), (1, 10), (3, 70_000), (2000, 300)] {
            let items: Vec<Option<Arc<Entity>>> = (0..n)
                .map(|i| (i % 7 != 3).then(|| entity(i, pad)))
                .collect();
            for f in [None, Some(fields.clone())] {
                for (head, tail) in [("", ""), ("{\"items\":", "}")] {
                    let want = one_piece(head, &items, f.as_deref(), tail);
                    let mut r = Rendering::new(
                        Bytes::from(head),
                        items.clone(),
                        f.clone(),
                        Bytes::from(tail),
                        Budget::unlimited(),
                    );
                    assert_eq!(r.nulls(), items.iter().filter(|i| i.is_none()).count());
                    assert_eq!(r.len(), n);
                    let mut got = Vec::new();
                    let mut chunks = 0;
                    while let Some(chunk) = r.next_chunk() {
                        let chunk = chunk.unwrap();
                        assert!(
                            chunk.len() < CHUNK_BYTES + 80_000,
                            "a chunk is about 64 KiB"
                        );
                        got.extend_from_slice(&chunk);
                        chunks += 1;
                    }
                    assert!(r.next_chunk().is_none());
                    assert_eq!(got, want, "{n} items, fields {f:?}");
                    assert!(chunks >= want.len() / (CHUNK_BYTES + 80_000));
                    if want.len() > 3 * CHUNK_BYTES {
                        assert!(chunks > 1);
                    }
                    let whole = Rendering::new(
                        Bytes::from(head),
                        items.clone(),
                        f.clone(),
                        Bytes::from(tail),
                        Budget::unlimited(),
                    )
                    .into_bytes()
                    .unwrap();
                    assert_eq!(&whole[..], &want[..]);
                }
            }
        }
    }

    #[test]
    fn a_spent_budget_ends_the_rendering_with_the_error() {
        let items = vec![Some(entity(1, 10))];
        let mut r = Rendering::new(
            Bytes::new(),
            items.clone(),
            None,
            Bytes::new(),
            Budget::new(Duration::ZERO),
        );
        assert!(matches!(
            r.next_chunk(),
            Some(Err(QueryError::Budget { .. }))
        ));
        assert!(r.next_chunk().is_none());
        let r = Rendering::new(
            Bytes::new(),
            items,
            None,
            Bytes::new(),
            Budget::new(Duration::ZERO),
        );
        assert!(matches!(r.into_bytes(), Err(QueryError::Budget { .. })));
    }
}
