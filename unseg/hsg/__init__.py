"""HSG (Ke et al., CVPR 2022): hierarchical segment grouping. The math of the method, on tensors:
``grouping`` (segments, spherical K-means, the transition chain P_{l+1} = C_l P_l), ``losses`` (SegSort+,
DMoN modularity and collapse, centroid contrast) and ``metrics`` (NFCovering). reference.md §3 says what the
released code (twke18/HSG) does where the paper is vague."""
