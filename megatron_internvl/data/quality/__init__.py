"""Data quality filtering after InternVL2.5 (section 4.3): heuristic rules, repetition
detection and optional LLM scoring over an InternVL meta JSON, with a review step.

Modules: `settings` (the rules file), `records` (the text of an annotation line, by role),
`repetition` (repeated n-grams, sentences, looping suffixes, compression), `rules` (the
heuristic rules and the per-sample check), `lengths` (a dataset's length distribution in
bounded memory), `scorer` (LLM domain and quality scoring), `pipeline` (the resumable
multi-process run), `manifest` (what a run folder records about its inputs, shared by the run
and the review), `review` (the review file and applying it), `report` (JSON, table, chart).
"""
