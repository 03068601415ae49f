"""Head loadings of attention-feature edges: they sum to the prompt graph's edges and each equals
the change of the edge when that head's frozen pattern row is zeroed."""

from __future__ import annotations

import dataclasses

import torch

from circuitgraph.attribution.head_loadings import head_loadings, head_seeds
from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
from circuitgraph.replacement import ReplacementModel, SpliceSpec
from dictionaries.site import ModelHooks, Site

PROMPT = "When Mary and John went to the park, John gave a book to"


def test_head_seeds_split_a_direction():
    d = torch.arange(12, dtype=torch.float64)
    rows = head_seeds(d, 3)
    assert torch.equal(rows.sum(0), d) and torch.equal(rows[1, 4:8], d[4:8]) and not rows[1, :4].any()


def test_head_loadings_sum_to_edges_and_equal_pattern_interventions(model64, dicts64):
    sites = [Site(0, "attn_z"), Site(0, "transcoder"), Site(1, "attn_z"), Site(1, "transcoder"), Site(2, "attn_z")]
    rm = ReplacementModel(model64, {s: dicts64[s] for s in sites})  # everything the target can read
    tokens = model64.to_tokens(PROMPT)
    site, pos = Site(2, "attn_z"), tokens.shape[1] - 1
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    feature = int(clean.sites[site].latents[0, pos].argmax())
    hl = head_loadings(rm, tokens, site, feature, pos)
    assert hl.values.shape[0] == model64.cfg.n_heads

    graph = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=100_000, progress=False))
    t = graph.index(hl.target)
    into = {graph.nodes[int(s)].id: float(w) for s, w, tt in zip(graph.sources, graph.weights, graph.targets, strict=True)
            if int(tt) == t}
    edges = hl.edges()
    big = [i for i, name in enumerate(hl.sources) if abs(float(edges[i])) > 1e-3]
    assert len(big) > 20
    for i in big:
        assert abs(float(edges[i]) - into[hl.sources[i]]) <= 1e-6 * max(1.0, abs(into[hl.sources[i]])), hl.sources[i]

    site_of = {s.id: s for s in rm.sites}

    def value(frozen, zeroed: str | None) -> float:
        lat = {s: r.latents.clone() for s, r in clean.sites.items()}
        err = {s: r.errors.clone() for s, r in clean.sites.items()}
        embed = model64.embed(tokens).clone()
        if zeroed is not None:
            name, p = zeroed.rsplit("@", 1)
            if name == "tok":
                embed[0, int(p)] = 0
            else:
                s, what = name.split("#")
                if what == "err":
                    err[site_of[s]][0, int(p)] = 0
                else:
                    lat[site_of[s]][0, int(p), int(what)] = 0
        spec = SpliceSpec(latents=lat, errors=err, embed=embed, frozen=frozen, record_active_values=True)
        with torch.no_grad():
            return float(rm.run(tokens, spec).sites[site].active_value[0, pos, feature])

    order = sorted(big, key=lambda i: -abs(float(edges[i])))
    cross = [i for i in order if not hl.sources[i].endswith(f"@{pos}")][:4]
    same = [i for i in order if hl.sources[i].endswith(f"@{pos}")][:2]
    assert len(cross) == 4 and len(same) == 2
    pattern = ModelHooks.pattern(site.layer)
    for head in range(model64.cfg.n_heads):
        patterns = dict(clean.frozen.patterns)
        patterns[pattern] = patterns[pattern].clone()
        patterns[pattern][0, head, pos] = 0  # head `head` no longer reads anything into the target's position
        without = dataclasses.replace(clean.frozen, patterns=patterns)
        base_full, base_without = value(clean.frozen, None), value(without, None)
        for i in cross + same:
            full = base_full - value(clean.frozen, hl.sources[i])
            rest = base_without - value(without, hl.sources[i])
            loading = float(hl.values[head, i])
            assert abs((full - rest) - loading) <= 1e-4 * max(1.0, abs(full)), (head, hl.sources[i])
    # attention moves these edges: several heads carry them
    assert int((hl.values[:, cross].abs() > 1e-3).sum(0).max()) >= 2
