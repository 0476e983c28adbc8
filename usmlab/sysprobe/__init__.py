"""system-probe as a stats source: fetch its dumps (fetch), read them (parse), judge (verdict).

Used with `--tracer system-probe`: no tracer of usmlab's own, system-probe's record of the lab
traffic is what gets judged. docs/sysprobe.md has the endpoint shapes and the rules.
"""
