"""Pass 4, schedule: HOP-B (placeholder until implemented below)."""
def schedule(gm, plan, regions):
    if plan.layout.hopb_chunks != 1:
        raise NotImplementedError("HOP-B scheduling (hopb_chunks > 1) is not implemented yet")
    return gm
