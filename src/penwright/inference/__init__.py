"""The generation engine every caller runs: the scheduler, the graph's runners, sampling."""
