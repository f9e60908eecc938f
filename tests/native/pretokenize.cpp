// llama.cpp's pre-tokenizer split (unicode_regex_split), compiled in from a tree: stock uses
// std::regex for DeepSeek-V3's regexes, our series its own scanner; the tests compare them.
// stdin: a count N, then N regexes, then texts until EOF, each as "<byte length>\n<bytes>".
// stdout: one line per text: the byte length of each piece, or "error: <what>".
#include "unicode.h"

#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

static bool read_record(std::string & out) {
    size_t len = 0;
    if (!(std::cin >> len)) {
        return false;
    }
    std::cin.get(); // the newline after the length
    out.resize(len);
    return static_cast<bool>(std::cin.read(out.data(), len));
}

int main() {
    std::ios::sync_with_stdio(false);
    size_t n = 0;
    std::cin >> n;
    std::vector<std::string> regexes(n);
    for (auto & r : regexes) {
        if (!read_record(r)) {
            std::cerr << "pretokenize: truncated regex list\n";
            return 2;
        }
    }
    std::string text;
    while (read_record(text)) {
        try {
            const auto pieces = unicode_regex_split(text, regexes, false);
            for (size_t i = 0; i < pieces.size(); ++i) {
                std::cout << (i ? " " : "") << pieces[i].size();
            }
            std::cout << "\n";
        } catch (const std::exception & e) {
            std::cout << "error: " << e.what() << "\n";
        }
    }
    return 0;
}
